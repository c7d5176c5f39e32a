// Command etcd is the etcd server from the pinned go.etcd.io/etcd/server/v3
// module (the version k8s.io/kubernetes itself requires).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	// etcdmain.Main parses the whole argv itself (it handles "--version",
	// "gateway", "grpc-proxy" before the server flags).
	etcdmain.Main(os.Args)
}
