#!/usr/bin/env bash
# Tests of the Helm chart with the real helm binary: helm lint, helm template with several value sets, the
# schema's refusals, and assertions on the rendered objects (tests/chart_test.py, standard-library Python).
#
# helm: $HELM, else ${SWITCHYARD_CACHE:-~/.cache/switchyard}/bin/helm (built by e2e/upstream/build.sh), else
# the one on PATH. A missing helm is a failure, not a skip: CI must run these.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ -z "${HELM:-}" ]]; then
  cached="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/bin/helm"
  if [[ -x "$cached" ]]; then
    HELM="$cached"
  elif command -v helm >/dev/null 2>&1; then
    HELM="$(command -v helm)"
  else
    echo "helm not found: build it with e2e/upstream/build.sh (or set HELM=/path/to/helm)" >&2
    exit 1
  fi
fi
command -v python3 >/dev/null 2>&1 || { echo "python3 is needed to run the chart tests" >&2; exit 1; }

export HELM
exec python3 "$here/chart_test.py"
