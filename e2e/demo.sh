#!/usr/bin/env bash
# The demo (`make demo`): a local cluster (a real control plane and simulated nodes, see e2e/README.md),
# Switchyard installed with the real helm, a ProxyConfig applied, echo pods behind a ClusterIP and a NodePort
# Service, and requests from a client pod on another node (and from outside the nodes) spread over the pods.
# Needs root. Idempotent: run it again on a running cluster and it reuses what is there.
#
#   E2E_CLUSTER=dev E2E_NODES=3 e2e/demo.sh        (or: make demo)
#   DEMO_REQUESTS=30                                requests to the ClusterIP
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CACHE=${CACHE:-$HOME/.cache/switchyard}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
# kubectl and helm come from the upstream build (e2e/upstream/build.sh), not from the host.
export PATH=$CACHE/bin:$HOME/.cargo/bin:/usr/local/go/bin:$PATH
CLUSTER=${E2E_CLUSTER:-dev}
NODES=${E2E_NODES:-3}
REQUESTS=${DEMO_REQUESTS:-30}
HELM=$CACHE/bin/helm
E2E=$CARGO_TARGET_DIR/debug/switchyard-e2e
export KUBECONFIG=/tmp/swyd-cluster-$CLUSTER/kubeconfig
RELEASE=switchyard
SYSNS=switchyard-system
DEMONS=demo
# The API server's address on the node network (e2e/README.md): what the agents use instead of the
# kubernetes Service's ClusterIP, which only works once they have programmed it.
API_HOST=172.31.0.2
API_PORT=6443

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
fail() { echo "demo: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "the local cluster needs root (network namespaces); run it as root"
[ "$NODES" -ge 2 ] || fail "E2E_NODES must be at least 2 (the client runs on a node without echo pods)"

step "Building the agent, the operator and the cluster harness"
cargo build --quiet --locked -p switchyard-agent -p switchyard-operator -p switchyard-e2e

step "Starting the local cluster '$CLUSTER' ($NODES nodes; reused if it already runs)"
make --no-print-directory -C "$ROOT" cluster-up E2E_CLUSTER="$CLUSTER" E2E_NODES="$NODES"
run kubectl get nodes -o wide

step "Installing Switchyard with helm ($($HELM version --short))"
# The chart's default images (switchyard.dev/switchyard-operator, switchyard.dev/switchyard-agent) are what
# the simulated nodes run as the locally built binaries.
if $HELM status "$RELEASE" -n "$SYSNS" >/dev/null 2>&1; then
  echo "release $RELEASE is already installed; upgrading it in place"
  verb=upgrade
else
  verb=install
fi
helm_args=("$verb" "$RELEASE" charts/switchyard -n "$SYSNS" --create-namespace
  --set apiServer.host="$API_HOST" --set apiServer.port="$API_PORT" --wait --timeout 3m)
printf '$ helm %s\n' "${helm_args[*]}"
"$HELM" "${helm_args[@]}" | sed -n '1,/^NOTES/p' | grep -v '^NOTES'   # the notes are long; see docs/install.md
run kubectl -n "$SYSNS" rollout status deployment/switchyard-operator --timeout=120s

step "Applying a ProxyConfig (examples/proxyconfig-iptables.yaml)"
run kubectl apply -f examples/proxyconfig-iptables.yaml
echo "waiting for every node's agent to report Ready ..."
want="$NODES/$NODES"
for _ in $(seq 1 120); do
  ready=$(kubectl get proxyconfig default -o jsonpath='{.status.ready}' 2>/dev/null || true)
  cond=$(kubectl get proxyconfig default -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)
  [ "$ready" = "$want" ] && [ "$cond" = True ] && break
  sleep 1
done
[ "$ready" = "$want" ] && [ "$cond" = True ] || {
  kubectl get proxyconfig,proxynodes || true
  fail "ProxyConfig default is not Ready $want after 120 s (ready=$ready Ready=$cond)"
}
run kubectl get proxyconfig

step "Deploying 3 echo pods behind a ClusterIP and a NodePort Service (namespace $DEMONS)"
kubectl create namespace "$DEMONS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
# The echo pods stay off node-1, where the client runs, so every request crosses nodes.
kubectl apply -n "$DEMONS" -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
spec:
  replicas: 3
  selector:
    matchLabels: {app: echo}
  template:
    metadata:
      labels: {app: echo}
    spec:
      terminationGracePeriodSeconds: 2
      affinity:
        nodeAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            nodeSelectorTerms:
              - matchExpressions:
                  - {key: kubernetes.io/hostname, operator: NotIn, values: [node-1]}
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels: {app: echo}
      containers:
        - name: echo
          image: switchyard.dev/echo:demo
          ports:
            - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  type: ClusterIP
  selector: {app: echo}
  ports:
    - {name: http, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata:
  name: echo-nodeport
spec:
  type: NodePort
  selector: {app: echo}
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  labels: {app: client}
spec:
  nodeName: node-1
  terminationGracePeriodSeconds: 1
  containers:
    - name: client
      image: switchyard.dev/echo:demo
YAML
run kubectl -n "$DEMONS" rollout status deployment/echo --timeout=120s
run kubectl -n "$DEMONS" wait pod/client --for=condition=Ready --timeout=120s
run kubectl -n "$DEMONS" get pods,services -o wide

CLUSTER_IP=$(kubectl -n "$DEMONS" get service echo -o jsonpath='{.spec.clusterIP}')
uid=$(kubectl -n "$DEMONS" get pod client -o jsonpath='{.metadata.uid}')
CLIENT_NETNS=swyd-$CLUSTER-pod-$(printf '%s' "$uid" | tr -cd '[:alnum:]' | cut -c1-11)
CLIENT_IP=$(kubectl -n "$DEMONS" get pod client -o jsonpath='{.status.podIP}')

# ask NETNS ADDR: one echo request from a network namespace; prints the reply line.
ask() { ip netns exec "$1" "$E2E" echo-client --tcp "$2" --timeout-seconds 2 2>/dev/null; }
# spread COUNT NETNS ADDR: COUNT requests, each reply printed, then the tally per pod.
spread() {
  local count=$1 netns=$2 addr=$3 replies="" reply i
  # The agents pick up the new Service within their minSyncPeriod: wait for the first answer.
  for _ in $(seq 1 30); do ask "$netns" "$addr" >/dev/null && break; sleep 1; done
  for i in $(seq 1 "$count"); do
    reply=$(ask "$netns" "$addr") || reply="FAILED"
    printf '  %2d  %s\n' "$i" "$reply"
    replies+="$reply"$'\n'
  done
  echo "  answers per pod:"
  printf '%s' "$replies" | grep -o '^pod=[^ ]* node=[^ ]*\|^FAILED' | sort | uniq -c | sed 's/^/   /'
  if printf '%s' "$replies" | grep -q FAILED; then fail "some requests to $addr failed"; fi
}

step "$REQUESTS requests from pod client ($CLIENT_IP on node-1) to the ClusterIP $CLUSTER_IP:80"
spread "$REQUESTS" "$CLIENT_NETNS" "$CLUSTER_IP:80"

NODE2_IP=$(kubectl get node node-2 -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}' | cut -d' ' -f1)
step "10 requests from outside the nodes (the node network's gateway, namespace swyd-$CLUSTER-net) to the NodePort $NODE2_IP:30080"
spread 10 "swyd-$CLUSTER-net" "$NODE2_IP:30080"

step "Switchyard's view"
run kubectl get proxyconfig,proxynodes
run kubectl describe proxyconfig default

cat <<EOF

The cluster is still running. To use it:
  export KUBECONFIG=$KUBECONFIG
  kubectl get proxyconfig,proxynodes
  kubectl -n $DEMONS get pods,services -o wide
  ip netns exec $CLIENT_NETNS $E2E echo-client --tcp $CLUSTER_IP:80   # one request from the client pod
  ip netns exec swyd-$CLUSTER-node-1 iptables-save | grep SWYD-               # the rules on node-1
  logs: /tmp/swyd-cluster-$CLUSTER/logs (agents and operator: pods/switchyard-system_*.log)
To remove it:
  make cluster-down$( [ "$CLUSTER" = dev ] || echo " E2E_CLUSTER=$CLUSTER")
EOF
