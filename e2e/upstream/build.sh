#!/usr/bin/env bash
# Build the pinned upstream components used by Switchyard's e2e tests and
# benchmarks (kube-apiserver, kube-controller-manager, kube-scheduler,
# kube-proxy, kubectl, etcd, helm) into ${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/bin.
#
# The build is skipped when the stamp file in that folder records the same hash
# of the pins and sources (go.mod, go.sum, the main packages, this script and
# the Go version), so the binaries are rebuilt only when something changes.
#
# Usage: e2e/upstream/build.sh [--force]
# Needs only Go (see go.mod for the minimum version) and the Go module proxy.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}"
bin="$cache/bin"
stamp="$bin/.upstream-stamp"

force=0
case "${1:-}" in
  --force) force=1 ;;
  "") ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

command -v go >/dev/null || { echo "build.sh: go not found in PATH" >&2; exit 1; }

# name:module dir (relative to $here):package. Cheapest first; each later
# binary reuses the packages the earlier ones already compiled.
targets=(
  "etcd:.:./cmd/etcd"
  "kube-proxy:.:./cmd/kube-proxy"
  "kube-scheduler:.:./cmd/kube-scheduler"
  "kube-controller-manager:.:./cmd/kube-controller-manager"
  "kube-apiserver:.:./cmd/kube-apiserver"
  "kubectl:.:./cmd/kubectl"
  "helm:helm:."
)

mkdir -p "$bin"

# Serialise concurrent runs (parallel test jobs sharing one cache).
if command -v flock >/dev/null; then
  exec 9>"$bin/.upstream-lock"
  flock 9
fi

inputs_hash() {
  (
    cd "$here"
    go version
    find build.sh go.mod go.sum cmd helm -type f \( -name '*.go' -o -name 'go.mod' -o -name 'go.sum' -o -name '*.sh' \) \
      | LC_ALL=C sort | xargs sha256sum
  ) | sha256sum | cut -d' ' -f1
}

want="$(inputs_hash)"
if [[ $force == 0 && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  missing=0
  for t in "${targets[@]}"; do [[ -x "$bin/${t%%:*}" ]] || missing=1; done
  if [[ $missing == 0 ]]; then
    echo "upstream binaries up to date in $bin"
    exit 0
  fi
fi
rm -f "$stamp"

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Static binaries like upstream's release builds (and no C toolchain needed).
export CGO_ENABLED=0

# Version stamping, as upstream's hack/lib/version.sh and helm's Makefile do,
# so `--version`, the apiserver's /version and Helm's kubeVersion checks see
# the real release instead of v0.0.0-master.
cd "$here"
kube_version="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"
kube_date="$(go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"
kube_minor="${kube_version#v1.}"; kube_minor="${kube_minor%%.*}"
kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$kube_minor"
  kube_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit= -X $pkg.buildDate=$kube_date"
done
helm_version="$(cd helm && go list -m -f '{{.Version}}' helm.sh/helm/v4)"
helm_ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$helm_version"
helm_ldflags+=" -X helm.sh/helm/v4/internal/version.metadata= -X helm.sh/helm/v4/internal/version.gitTreeState=clean"

total_start="$(now)"

t0="$(now)"
(cd "$here" && go mod download) && (cd "$here/helm" && go mod download)
printf '%-24s %7ss\n' "module download" "$(since "$t0")"

for t in "${targets[@]}"; do
  IFS=: read -r name dir pkg <<<"$t"
  if [[ $name == helm ]]; then
    flags=(-ldflags "$helm_ldflags")
  else
    flags=(-tags selinux,notest,grpcnotrace -ldflags "$kube_ldflags")
  fi
  t0="$(now)"
  (cd "$here/$dir" && go build -trimpath -buildvcs=false "${flags[@]}" -o "$bin/.$name.tmp" "$pkg")
  mv -f "$bin/.$name.tmp" "$bin/$name"
  printf '%-24s %7ss\n' "$name" "$(since "$t0")"
done

printf '%-24s %7ss\n' "total" "$(since "$total_start")"
echo "$want" >"$stamp"
echo "upstream binaries in $bin (kubernetes $kube_version, helm $helm_version)"
