// Command helm is the Helm client from the pinned helm.sh/helm/v4 module. It
// lives in its own Go module because Helm requires newer k8s.io libraries
// than the control-plane components pinned one folder up.
package main

import (
	"errors"
	"log/slog"
	"os"

	helmcmd "helm.sh/helm/v4/pkg/cmd"
	"helm.sh/helm/v4/pkg/kube"
	_ "k8s.io/client-go/plugin/pkg/client/auth" // exec/oidc auth providers in kubeconfigs
)

func main() {
	// Name the server-side-apply field manager "helm", as the released binary does.
	kube.ManagedFieldsManager = "helm"

	root, err := helmcmd.NewRootCmd(os.Stdout, os.Args[1:], helmcmd.SetupLogging)
	if err != nil {
		slog.Warn("command failed", slog.Any("error", err))
		os.Exit(1)
	}
	if err := root.Execute(); err != nil {
		var cerr helmcmd.CommandError
		if errors.As(err, &cerr) {
			os.Exit(cerr.ExitCode)
		}
		os.Exit(1)
	}
}
