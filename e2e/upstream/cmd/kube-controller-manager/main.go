// Command kube-controller-manager is upstream's kube-controller-manager, built
// from the pinned k8s.io/kubernetes module for Switchyard's e2e control plane.
package main

import (
	"os"
	_ "time/tzdata" // CronJob time zones need the embedded zone database

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // --logging-format=json
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // build info metric
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	os.Exit(cli.Run(app.NewControllerManagerCommand()))
}
