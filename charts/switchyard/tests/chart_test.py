#!/usr/bin/env python3
"""Tests of the Switchyard Helm chart with the real helm binary: lint, render with several value sets, and
check the rendered objects (operator command line, RBAC verbs, hooks, the optional ProxyConfig), the values
schema's refusals and the CRD copies. Standard library only; run through tests/run.sh.

The rendered manifests are read with a small YAML reader that knows the subset `helm template` prints for this
chart (block mappings and sequences, plain and quoted scalars, flow lists of scalars, block scalars). Anything
else is an error, never a silent misreading.
"""

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.dirname(HERE)
REPO = os.path.dirname(os.path.dirname(CHART))
HELM = os.environ["HELM"]
NAMESPACE = "switchyard-system"
RELEASE = "switchyard"

failures = []


def check(cond, what, detail="", quiet=False):
    if cond:
        if not quiet:
            print(f"  ok   {what}")
    else:
        print(f"  FAIL {what}" + (f"\n       {detail}" if detail else ""))
        failures.append(what)
    return cond


# --- a YAML reader for the subset helm template prints ------------------------------------------------------


class YamlError(Exception):
    pass


INT = re.compile(r"^[-+]?[0-9]+$")
FLOAT = re.compile(r"^[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$")


def scalar(text):
    s = text.strip()
    if s.startswith('"'):
        try:
            value, end = json.JSONDecoder().raw_decode(s)
        except json.JSONDecodeError as e:
            raise YamlError(f"bad double-quoted scalar {s!r}: {e}") from e
        if s[end:].strip():
            raise YamlError(f"text after a quoted scalar: {s!r}")
        return value
    if s.startswith("'"):
        if len(s) < 2 or not s.endswith("'"):
            raise YamlError(f"bad single-quoted scalar {s!r}")
        return s[1:-1].replace("''", "'")
    if s.startswith("["):
        if not s.endswith("]"):
            raise YamlError(f"flow sequence on several lines is not supported: {s!r}")
        return [scalar(item) for item in split_flow(s[1:-1])]
    if s.startswith("{"):
        if s != "{}":
            raise YamlError(f"only empty flow mappings are supported: {s!r}")
        return {}
    if s[:1] in ("&", "*", "!", "%", "@", "`") or " #" in s:
        raise YamlError(f"unsupported YAML: {s!r}")
    if s in ("", "~", "null", "Null", "NULL"):
        return None
    if s in ("true", "True", "TRUE"):
        return True
    if s in ("false", "False", "FALSE"):
        return False
    if INT.match(s):
        return int(s)
    if FLOAT.match(s):
        return float(s)
    return s


def split_flow(inner):
    items, cur, quote = [], "", None
    for ch in inner:
        if quote:
            cur += ch
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            cur += ch
        elif ch == ",":
            items.append(cur)
            cur = ""
        elif ch in "[]{}":
            raise YamlError(f"nested flow collections are not supported: [{inner}]")
        else:
            cur += ch
    if cur.strip():
        items.append(cur)
    return [i for i in items if i.strip()]


def split_key(content):
    """`key: value` -> (key, value); None when the line is not a mapping entry."""
    if content.startswith('"'):
        try:
            key, end = json.JSONDecoder().raw_decode(content)
        except json.JSONDecodeError:
            return None
        rest = content[end:]
        if rest == ":" or rest.startswith(": "):
            return key, rest[1:].strip()
        return None
    if content.startswith("'"):
        return None
    m = re.match(r"^([^\s#'\"][^:]*?):( (.*))?$", content)
    if not m:
        return None
    return m.group(1), (m.group(3) or "").strip()


def is_item(content):
    return content == "-" or content.startswith("- ")


class Reader:
    def __init__(self, lines):
        self.lines = lines

    def skip(self, i):
        while i < len(self.lines) and (not self.lines[i].strip() or self.lines[i].lstrip().startswith("#")):
            i += 1
        return i

    def indent(self, i):
        line = self.lines[i]
        lead = line[: len(line) - len(line.lstrip())]
        if "\t" in lead:
            raise YamlError(f"tab in indentation: {line!r}")
        return len(lead)

    def node(self, i, col):
        content = self.lines[i][col:]
        if is_item(content):
            return self.seq(i, col)
        if split_key(content):
            return self.mapping(i, col)
        if content.strip()[:1] in ("|", ">"):
            return self.block_scalar(i + 1, content.strip(), col - 1)
        return scalar(content), i + 1

    def seq(self, i, col):
        out = []
        while True:
            i = self.skip(i)
            if i >= len(self.lines) or self.indent(i) < col:
                break
            if self.indent(i) > col:
                raise YamlError(f"unexpected indentation: {self.lines[i]!r}")
            content = self.lines[i][col:]
            if not is_item(content):
                break
            rest = content[1:]
            if not rest.strip():
                j = self.skip(i + 1)
                if j >= len(self.lines) or self.indent(j) <= col:
                    out.append(None)
                    i += 1
                    continue
                value, i = self.node(j, self.indent(j))
            else:
                inner = col + 1 + len(rest) - len(rest.lstrip(" "))
                self.lines[i] = " " * inner + rest.lstrip(" ")
                value, i = self.node(i, inner)
            out.append(value)
        return out, i

    def mapping(self, i, col):
        out = {}
        while True:
            i = self.skip(i)
            if i >= len(self.lines) or self.indent(i) < col:
                break
            if self.indent(i) > col:
                raise YamlError(f"unexpected indentation: {self.lines[i]!r}")
            content = self.lines[i][col:]
            if is_item(content):
                break
            entry = split_key(content)
            if not entry:
                raise YamlError(f"expected `key: value`: {self.lines[i]!r}")
            key, rest = entry
            if key in out:
                raise YamlError(f"duplicate key {key!r}")
            i += 1
            if not rest:
                j = self.skip(i)
                if j < len(self.lines) and self.indent(j) > col:
                    value, i = self.node(j, self.indent(j))
                elif j < len(self.lines) and self.indent(j) == col and is_item(self.lines[j][col:]):
                    value, i = self.seq(j, col)
                else:
                    value = None
            elif rest[0] in "|>":
                value, i = self.block_scalar(i, rest, col)
            else:
                value = scalar(rest)
            out[key] = value
        return out, i

    def block_scalar(self, i, indicator, parent):
        if indicator not in ("|", "|-", ">", ">-"):
            raise YamlError(f"unsupported block scalar indicator {indicator!r}")
        body, width = [], None
        while i < len(self.lines):
            line = self.lines[i]
            if line.strip():
                ind = len(line) - len(line.lstrip(" "))
                if ind <= parent:
                    break
                width = ind if width is None else width
                body.append(line[width:])
            else:
                body.append("")
            i += 1
        while body and not body[-1]:
            body.pop()
        text = ("\n" if indicator[0] == "|" else " ").join(body)
        return (text if indicator.endswith("-") else text + "\n"), i


def load_all(text):
    docs, cur = [], []
    for line in text.split("\n") + ["---"]:
        if line.rstrip() == "---":
            reader = Reader(cur)
            start = reader.skip(0)
            if start < len(cur):
                value, end = reader.node(start, reader.indent(start))
                end = reader.skip(end)
                if end < len(cur):
                    raise YamlError(f"unparsed text: {cur[end]!r}")
                docs.append(value)
            cur = []
        else:
            cur.append(line)
    return docs


# --- helm ---------------------------------------------------------------------------------------------------


def helm(*args):
    env = dict(os.environ, KUBECONFIG=os.path.join(tempfile.gettempdir(), "switchyard-chart-test-no-cluster"))
    return subprocess.run([HELM, *args], capture_output=True, text=True, env=env)


def values_file(tmp, name, text):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def render(title, *args):
    """helm template with these arguments; returns the objects, or None when rendering failed."""
    print(f"\n== helm template: {title}")
    res = helm("template", RELEASE, CHART, "--namespace", NAMESPACE, *args)
    if not check(res.returncode == 0, "renders", res.stderr.strip()):
        return None
    try:
        objs = [o for o in load_all(res.stdout) if o is not None]
    except YamlError as e:
        check(False, "output parses", str(e))
        return None
    return objs


def refuse(title, want, *args):
    print(f"\n== helm template must fail: {title}")
    res = helm("template", RELEASE, CHART, "--namespace", NAMESPACE, *args)
    check(res.returncode != 0, "helm exits non-zero", res.stdout[:300])
    missing = [w for w in want if w not in res.stderr]
    check(not missing, "error says " + " / ".join(repr(w) for w in want), f"stderr: {res.stderr.strip()}")


# --- queries on rendered objects ----------------------------------------------------------------------------


def find(objs, kind, name=None):
    return [o for o in objs if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs, kind, name=None):
    found = find(objs, kind, name)
    check(len(found) == 1, f"exactly one {kind}" + (f" {name}" if name else ""), f"found {len(found)}", quiet=True)
    return found[0] if found else {}


def grants(role):
    """The (apiGroup, resource, verb) triples a Role or ClusterRole grants."""
    out = set()
    for rule in role.get("rules") or []:
        for g in rule.get("apiGroups") or []:
            for r in rule.get("resources") or []:
                for v in rule.get("verbs") or []:
                    out.add((g, r, v))
    return out


def expand(spec):
    return {(g, r, v) for groups, resources, verbs in spec for g in groups for r in resources for v in verbs}


def fmt(triples):
    return ", ".join(f"{g or 'core'}/{r}:{v}" for g, r, v in sorted(triples))


def operator_container(objs):
    dep = one(objs, "Deployment", f"{RELEASE}-operator")
    containers = dep.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or [{}]
    return dep, containers[0]


def env_of(container):
    return {e["name"]: e for e in container.get("env") or []}


def expected_args(agent_image, host, port, leader="true", log="info"):
    return [
        "--namespace", "$(POD_NAMESPACE)",
        "--agent-image", agent_image,
        "--agent-service-account", "switchyard-agent",
        "--api-server-host", host,
        "--api-server-port", str(port),
        f"--leader-election={leader}",
        "--health-bind-address", "0.0.0.0:8080",
        "--metrics-bind-address", "0.0.0.0:8081",
        "--log-level", log,
    ]  # fmt: skip


OPERATOR_CLUSTER = expand([
    (["switchyard.dev"], ["proxyconfigs"], ["get", "list", "watch", "patch", "update"]),
    (["switchyard.dev"], ["proxyconfigs/status", "proxyconfigs/finalizers"], ["get", "patch", "update"]),
    (["switchyard.dev"], ["proxynodes"], ["get", "list", "watch", "delete"]),
    ([""], ["nodes"], ["get", "list", "watch"]),
    (["", "events.k8s.io"], ["events"], ["create", "patch"]),
])  # fmt: skip
OPERATOR_NAMESPACED = expand([
    (["apps"], ["daemonsets"], ["get", "list", "watch", "create", "patch", "update", "delete"]),
    ([""], ["configmaps"], ["get", "list", "watch", "create", "patch", "update", "delete"]),
    (["coordination.k8s.io"], ["leases"], ["get", "create", "update", "patch"]),
])  # fmt: skip
AGENT_CLUSTER = expand([
    ([""], ["services", "nodes"], ["get", "list", "watch"]),
    (["discovery.k8s.io"], ["endpointslices"], ["get", "list", "watch"]),
    (["switchyard.dev"], ["proxynodes"], ["get", "list", "watch", "create", "patch", "update"]),
    (["switchyard.dev"], ["proxynodes/status"], ["get", "patch", "update"]),
    (["switchyard.dev"], ["proxyconfigs"], ["get", "list", "watch"]),
    (["", "events.k8s.io"], ["events"], ["create", "patch"]),
])  # fmt: skip
CLEANUP_CLUSTER = expand([(["switchyard.dev"], ["proxyconfigs"], ["delete", "list", "watch"])])
HOOK_POLICY = "before-hook-creation,hook-succeeded"


# --- the checks ---------------------------------------------------------------------------------------------


def check_common(objs):
    """What holds for every value set: labels, namespaces, RBAC, the agent SA, the operator pod."""
    bad_labels, bad_ns = [], []
    want_labels = {
        "app.kubernetes.io/name": "switchyard",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/version": "0.1.0",
        "app.kubernetes.io/managed-by": "Helm",
    }
    for o in objs:
        what = f"{o['kind']}/{o['metadata']['name']}"
        labels = o["metadata"].get("labels") or {}
        wrong = [k for k, v in want_labels.items() if labels.get(k) != v]
        wrong += [] if labels.get("app.kubernetes.io/component") else ["app.kubernetes.io/component"]
        if wrong:
            bad_labels.append(f"{what} ({', '.join(wrong)})")
        cluster_scoped = o["kind"] in ("ClusterRole", "ClusterRoleBinding", "ProxyConfig")
        if o["metadata"].get("namespace") != (None if cluster_scoped else NAMESPACE):
            bad_ns.append(what)
    check(not bad_labels, f"standard labels (name, instance, version, managed-by, component) on all {len(objs)} objects",
          "; ".join(bad_labels))  # fmt: skip
    check(not bad_ns, f"namespaced objects in {NAMESPACE}, cluster-scoped ones without namespace", ", ".join(bad_ns))

    print("  -- RBAC")
    roles = {(o["kind"], o["metadata"]["name"]): o for o in objs if o["kind"] in ("Role", "ClusterRole")}
    stars = [f"{kind} {name}: {fmt(t for t in grants(role) if '*' in t)}" for (kind, name), role in roles.items()
             if any("*" in t for t in grants(role))]  # fmt: skip
    check(not stars, f"no wildcard in any of the {len(roles)} Roles/ClusterRoles", "; ".join(stars))
    for kind, name, want in [
        ("ClusterRole", f"{RELEASE}-operator", OPERATOR_CLUSTER),
        ("Role", f"{RELEASE}-operator", OPERATOR_NAMESPACED),
        ("ClusterRole", f"{RELEASE}-agent", AGENT_CLUSTER),
    ]:
        got = grants(roles.get((kind, name), {}))
        check(got == want, f"{kind} {name}: exactly the expected verbs",
              f"extra: {fmt(got - want)}; missing: {fmt(want - got)}")  # fmt: skip
    bad = []
    for b in find(objs, "ClusterRoleBinding") + find(objs, "RoleBinding"):
        what = f"{b['kind']}/{b['metadata']['name']}"
        if (b["roleRef"]["kind"], b["roleRef"]["name"]) not in roles:
            bad.append(f"{what}: no {b['roleRef']['kind']} {b['roleRef']['name']}")
        for s in b["subjects"]:
            if s["kind"] != "ServiceAccount" or s.get("namespace") != NAMESPACE or not find(objs, "ServiceAccount", s["name"]):
                bad.append(f"{what}: subject {s}")
    check(not bad, "every binding names a rendered role and a ServiceAccount of this release", "; ".join(bad))
    bound = {(b["roleRef"]["name"], s["name"]) for b in find(objs, "ClusterRoleBinding") for s in b["subjects"]}
    check((f"{RELEASE}-operator", f"{RELEASE}-operator") in bound, "operator ClusterRole bound to the operator SA")
    check((f"{RELEASE}-agent", "switchyard-agent") in bound, "agent ClusterRole bound to the agent SA")

    print("  -- agent ServiceAccount")
    sa = one(objs, "ServiceAccount", "switchyard-agent")
    check(sa.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component") == "agent",
          "agent SA labelled component=agent")  # fmt: skip

    print("  -- operator pod")
    dep, c = operator_container(objs)
    pod = dep.get("spec", {}).get("template", {}).get("spec", {})
    check(pod.get("serviceAccountName") == f"{RELEASE}-operator", "runs as the operator SA")
    check(c.get("command") == ["switchyard-operator"], "command is switchyard-operator", str(c.get("command")))
    env = env_of(c)
    for var, field in [("POD_NAMESPACE", "metadata.namespace"), ("POD_NAME", "metadata.name")]:
        got = env.get(var, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        check(got == field, f"env {var} from the downward API ({field})", str(got))
    probes = (c.get("livenessProbe", {}).get("httpGet"), c.get("readinessProbe", {}).get("httpGet"))
    check(probes == ({"path": "/healthz", "port": "health"}, {"path": "/readyz", "port": "health"}),
          "liveness /healthz and readiness /readyz on the health port", str(probes))  # fmt: skip
    ports = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
    check(ports == {"health": 8080, "metrics": 8081}, "ports health 8080 and metrics 8081", str(ports))
    sc = c.get("securityContext") or {}
    check(sc.get("runAsNonRoot") is True and pod.get("securityContext", {}).get("runAsNonRoot") is True,
          "runAsNonRoot (pod and container)")  # fmt: skip
    check(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
    check(sc.get("allowPrivilegeEscalation") is False, "no privilege escalation")
    check(sc.get("capabilities") == {"drop": ["ALL"]}, "every capability dropped, none added", str(sc))
    check("resources" in c, "resources set")


def check_hook(objs, timeout="300s"):
    print("  -- pre-delete cleanup hook")
    name = f"{RELEASE}-cleanup"
    job = one(objs, "Job", name)
    ann = job.get("metadata", {}).get("annotations") or {}
    check(ann.get("helm.sh/hook") == "pre-delete", "Job is a pre-delete hook", str(ann))
    check(ann.get("helm.sh/hook-delete-policy") == HOOK_POLICY, f"Job hook-delete-policy {HOOK_POLICY}", str(ann))
    pod = job.get("spec", {}).get("template", {}).get("spec", {})
    c = (pod.get("containers") or [{}])[0]
    argv = (c.get("command") or []) + (c.get("args") or [])
    check(argv == ["switchyard-operator", "delete-all", "--timeout", timeout],
          f"Job runs switchyard-operator delete-all --timeout {timeout}", str(argv))  # fmt: skip
    check(c.get("image") == operator_container(objs)[1].get("image"), "Job uses the operator image")
    check(pod.get("serviceAccountName") == name, "Job runs as its own SA")
    check(pod.get("restartPolicy") == "Never", "Job pod restartPolicy Never")
    check(c.get("securityContext", {}).get("readOnlyRootFilesystem") is True, "Job container read-only, non-root")
    job_weight = int(ann.get("helm.sh/hook-weight", "0"))
    for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding"):
        o = one(objs, kind, name)
        a = o.get("metadata", {}).get("annotations") or {}
        check(a.get("helm.sh/hook") == "pre-delete" and a.get("helm.sh/hook-delete-policy") == HOOK_POLICY,
              f"{kind} {name} is a pre-delete hook with the same delete policy", str(a))  # fmt: skip
        check(int(a.get("helm.sh/hook-weight", "0")) < job_weight, f"{kind} {name} is created before the Job")
    got = grants(one(objs, "ClusterRole", name))
    check(got == CLEANUP_CLUSTER, "cleanup ClusterRole: proxyconfigs delete/list/watch only", fmt(got))


# --- the Argo CD health check of docs/argocd.md, run with Lua 5.1 (Argo CD's gopher-lua speaks 5.1) ---------


def to_lua(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nil"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "{" + ", ".join(to_lua(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{to_lua(k)}] = {to_lua(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"cannot write {value!r} as Lua")


def argocd_health_script():
    """The Lua in docs/argocd.md: the argocd-cm entry of its first yaml block."""
    with open(os.path.join(REPO, "docs", "argocd.md")) as f:
        text = f.read()
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        for doc in load_all(block):
            script = ((doc or {}).get("data") or {}).get("resource.customizations.health.switchyard.dev_ProxyConfig")
            if script:
                return script
    return None


def proxyconfig(generation=2, observed=2, ready="3/3", deleting=False, **conds):
    """A ProxyConfig with the given conditions: Ready=("True", "Ready", "message"), ..."""
    obj = {"apiVersion": "switchyard.dev/v1alpha1", "kind": "ProxyConfig",
           "metadata": {"name": "default", "generation": generation}, "spec": {"mode": "iptables"}}  # fmt: skip
    if deleting:
        obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    if conds or observed is not None:
        obj["status"] = {"observedGeneration": observed, "ready": ready, "conditions": [
            {"type": t, "status": c[0], "reason": c[1], "message": c[2] if len(c) > 2 else "",
             "observedGeneration": observed, "lastTransitionTime": "2026-01-01T00:00:00Z"}
            for t, c in conds.items()
        ]}  # fmt: skip
    return obj


HEALTHY = dict(Available=("True", "AllNodesReady"), Progressing=("False", "RolloutComplete"),
               Degraded=("False", "AsExpected"), Ready=("True", "Ready"))  # fmt: skip
ARGOCD_CASES = [
    ("no status yet", {"apiVersion": "switchyard.dev/v1alpha1", "kind": "ProxyConfig",
                       "metadata": {"name": "default", "generation": 1}}, "Progressing", "operator to report"),
    ("status of an older generation", proxyconfig(generation=3, observed=2, **HEALTHY),
     "Progressing", "generation 3"),
    ("all nodes ready", proxyconfig(**HEALTHY), "Healthy", "3/3 nodes ready"),
    ("rolling out", proxyconfig(ready="1/3", **dict(HEALTHY, Available=("True", "SomeNodesReady"),
     Progressing=("True", "RollingOut", "1/3 nodes updated, 1 ready"), Ready=("False", "NotReady"))),
     "Progressing", "RollingOut: 1/3 nodes updated, 1 ready"),
    ("rollout hung", proxyconfig(ready="1/3", **dict(HEALTHY, Progressing=("True", "RollingOut"),
     Degraded=("True", "RolloutHung", "no progress for 600s: 1/3 nodes updated, 1 ready"),
     Ready=("False", "NotReady"))), "Degraded", "RolloutHung: no progress for 600s"),
    ("node conflict", proxyconfig(**dict(HEALTHY, Degraded=("True", "NodeConflict", "nodes kept by an older ProxyConfig: node-2"),
     Ready=("False", "NotReady"))), "Degraded", "NodeConflict"),
    ("invalid spec", proxyconfig(**dict(HEALTHY, Degraded=("True", "InvalidSpec", "bad"),
     Ready=("False", "NotReady"))), "Degraded", "InvalidSpec: bad"),
    ("agents failing", proxyconfig(**dict(HEALTHY, Degraded=("True", "AgentsFailing"),
     Ready=("False", "NotReady"))), "Degraded", "AgentsFailing"),
    ("being deleted", proxyconfig(deleting=True, **dict(HEALTHY, Degraded=("True", "CleanupPending",
     "waiting for agents to remove their rules"), Ready=("False", "NotReady"))), "Progressing", "CleanupPending: waiting"),
    ("no node ready, not rolling out", proxyconfig(ready="0/3", **dict(HEALTHY,
     Available=("False", "NoNodesReady", "0/3 nodes ready"), Ready=("False", "NotReady"))), "Degraded", "NoNodesReady"),
    ("no node selected", proxyconfig(ready="0/0", **dict(HEALTHY, Available=("True", "NoNodesSelected"))),
     "Healthy", "0/0 nodes ready"),
    ("not ready for another reason", proxyconfig(**dict(HEALTHY, Ready=("False", "NotReady", "waiting"))),
     "Progressing", "NotReady: waiting"),
]  # fmt: skip


def check_argocd_health():
    print("\n== Argo CD health check in docs/argocd.md (Lua 5.1)")
    lua = os.environ.get("LUA") or shutil.which("lua5.1")
    if not check(bool(lua), "lua5.1 is installed", "install the Debian package lua5.1 (or set LUA=/path/to/lua5.1)"):
        return
    script = argocd_health_script()
    if not check(bool(script), "docs/argocd.md holds the argocd-cm health entry for switchyard.dev_ProxyConfig"):
        return
    for title, obj, want_status, want_message in ARGOCD_CASES:
        program = f"obj = {to_lua(obj)}\nlocal function health()\n{script}\nend\n" \
                  "local hs = health()\nio.write(hs.status, '\\n', hs.message or '', '\\n')\n"  # fmt: skip
        res = subprocess.run([lua, "-"], input=program, capture_output=True, text=True)
        status, _, message = res.stdout.partition("\n")
        check(res.returncode == 0 and status == want_status and want_message in message,
              f"{title}: {want_status} ({want_message!r})",
              f"got {status!r} {message.strip()!r} {res.stderr.strip()}")  # fmt: skip


def main():
    print(f"helm: {HELM} ({helm('version', '--short').stdout.strip()})")
    print(f"chart: {CHART}")

    print("\n== CRD copies match crds/ at the repository root")
    src = os.path.join(REPO, "crds")
    dst = os.path.join(CHART, "crds")
    want = sorted(f for f in os.listdir(src) if f.endswith(".yaml"))
    have = sorted(os.listdir(dst))
    check(want == have, f"chart crds/ holds exactly {want}", f"chart has {have}")
    for f in want:
        same = os.path.exists(os.path.join(dst, f)) and filecmp.cmp(os.path.join(src, f), os.path.join(dst, f), False)
        check(same, f"{f} identical to crds/{f}", f"run: cp crds/*.yaml {os.path.relpath(dst, REPO)}/")

    print("\n== helm lint")
    for title, args in [
        ("default values", []),
        ("defaultProxyConfig enabled, apiServer set", ["--set", "defaultProxyConfig.enabled=true",
                                                       "--set", "apiServer.host=10.0.0.10"]),
    ]:  # fmt: skip
        res = helm("lint", "--strict", CHART, *args)
        check(res.returncode == 0 and "0 chart(s) failed" in res.stdout, f"lint --strict: {title}",
              (res.stdout + res.stderr).strip())  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        objs = render("default values")
        if objs is not None:
            kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objs)
            print("  rendered: " + ", ".join(kinds))
            check_common(objs)
            _, c = operator_container(objs)
            want = expected_args("switchyard.dev/switchyard-agent:0.1.0", "", 6443)
            check(c.get("args") == want, "operator args: agent image and SA, api server, leader election, binds",
                  f"got {c.get('args')}")  # fmt: skip
            check(c.get("image") == "switchyard.dev/switchyard-operator:0.1.0", "operator image defaults to appVersion")
            check(c.get("imagePullPolicy") == "IfNotPresent", "operator pull policy IfNotPresent")
            check("KUBERNETES_SERVICE_HOST" not in env_of(c), "no API server override without apiServer.host")
            check(operator_container(objs)[0]["spec"]["replicas"] == 1, "one operator replica")
            check(not find(objs, "ProxyConfig"), "no ProxyConfig unless defaultProxyConfig.enabled")
            check(not find(objs, "Service"), "no metrics Service unless enabled")
            check(not find(objs, "ResourceQuota"), "no ResourceQuota unless enabled")
            check(not find(objs, "CustomResourceDefinition"), "CRDs come from crds/, not templates/")
            check_hook(objs)

        objs = render("2 operator replicas", "--set", "operator.replicas=2")
        if objs is not None:
            dep, c = operator_container(objs)
            check(dep["spec"]["replicas"] == 2, "Deployment has 2 replicas")
            check("--leader-election=true" in c.get("args", []), "leader election on")

        ipvs = values_file(tmp, "ipvs.yaml", """\
apiServer:
  host: api.example.internal
  port: 443
defaultProxyConfig:
  enabled: true
  name: ipvs-pool
  spec:
    mode: ipvs
    nodeSelector:
      matchLabels:
        switchyard.dev/pool: ipvs
    ipvs:
      scheduler: lc
      strictARP: true
    rollout:
      maxUnavailable: 10%
    clusterCIDRs:
      - 10.244.0.0/16
""")  # fmt: skip
        objs = render("defaultProxyConfig enabled with an ipvs spec", "-f", ipvs)
        if objs is not None:
            check_common(objs)
            pc = one(objs, "ProxyConfig", "ipvs-pool")
            check(pc.get("apiVersion") == "switchyard.dev/v1alpha1", "ProxyConfig apiVersion switchyard.dev/v1alpha1")
            want_spec = {
                "mode": "ipvs",
                "nodeSelector": {"matchLabels": {"switchyard.dev/pool": "ipvs"}},
                "ipvs": {"scheduler": "lc", "strictARP": True},
                "rollout": {"maxUnavailable": "10%"},
                "clusterCIDRs": ["10.244.0.0/16"],
            }
            check(pc.get("spec") == want_spec, "ProxyConfig spec is the values' spec, as it is", str(pc.get("spec")))
            _, c = operator_container(objs)
            want = expected_args("switchyard.dev/switchyard-agent:0.1.0", "api.example.internal", 443)
            check(c.get("args") == want, "operator args carry the API server host and port", f"got {c.get('args')}")
            env = env_of(c)
            check(env.get("KUBERNETES_SERVICE_HOST", {}).get("value") == "api.example.internal"
                  and env.get("KUBERNETES_SERVICE_PORT", {}).get("value") == "443",
                  "operator's own client reaches the API server directly too")  # fmt: skip
            job = one(objs, "Job", f"{RELEASE}-cleanup")
            jenv = env_of(job["spec"]["template"]["spec"]["containers"][0])
            check(jenv.get("KUBERNETES_SERVICE_HOST", {}).get("value") == "api.example.internal",
                  "cleanup Job reaches the API server directly too")  # fmt: skip

        images = values_file(tmp, "images.yaml", """\
imagePullSecrets:
  - name: regcred
operator:
  image:
    repository: registry.example.com:5000/team/switchyard-operator
    tag: v0.1.0-rc.1
    pullPolicy: Always
  logLevel: debug
  leaderElection: false
agent:
  image:
    repository: registry.example.com:5000/team/switchyard-agent
    tag: v0.1.0-rc.2
  serviceAccount:
    name: switchyard-agent
cleanup:
  timeout: 10m
""")  # fmt: skip
        objs = render("custom images, one replica without leader election", "-f", images)
        if objs is not None:
            check_common(objs)
            dep, c = operator_container(objs)
            check(c.get("image") == "registry.example.com:5000/team/switchyard-operator:v0.1.0-rc.1",
                  "operator image from values", c.get("image"))  # fmt: skip
            check(c.get("imagePullPolicy") == "Always", "operator pull policy from values")
            want = expected_args("registry.example.com:5000/team/switchyard-agent:v0.1.0-rc.2", "", 6443,
                                 leader="false", log="debug")  # fmt: skip
            check(c.get("args") == want, "operator args carry the custom agent image", f"got {c.get('args')}")
            check(dep["spec"]["template"]["spec"].get("imagePullSecrets") == [{"name": "regcred"}],
                  "operator pod uses the pull secret")  # fmt: skip
            without = [sa["metadata"]["name"] for sa in find(objs, "ServiceAccount")
                       if sa.get("imagePullSecrets") != [{"name": "regcred"}]]  # fmt: skip
            check(not without, "every ServiceAccount carries the pull secret (the agents' pods pull with it)",
                  f"without: {without}")  # fmt: skip
            check_hook(objs, timeout="10m")

        objs = render("metrics Service, ResourceQuota, no cleanup hook",
                      "--set", "operator.metrics.service.enabled=true", "--set", "resourceQuota.enabled=true",
                      "--set", "cleanup.enabled=false")  # fmt: skip
        if objs is not None:
            svc = one(objs, "Service", f"{RELEASE}-operator-metrics")
            check(svc.get("spec", {}).get("ports") == [{"name": "metrics", "port": 8081, "targetPort": "metrics",
                                                         "protocol": "TCP"}], "metrics Service on 8081")  # fmt: skip
            sel = svc.get("spec", {}).get("selector", {})
            check(sel.get("app.kubernetes.io/component") == "operator", "metrics Service selects the operator")
            rq = one(objs, "ResourceQuota")
            scope = rq.get("spec", {}).get("scopeSelector", {}).get("matchExpressions", [{}])[0]
            check(scope.get("values") == ["system-node-critical", "system-cluster-critical"],
                  "ResourceQuota admits the agents' and the operator's priority classes")  # fmt: skip
            hooks = [o for o in objs if "helm.sh/hook" in (o["metadata"].get("annotations") or {})]
            check(not hooks, "no hook when cleanup.enabled=false")

        objs = render("fullnameOverride", "--set", "fullnameOverride=proxy")
        if objs is not None:
            names = {(o["kind"], o["metadata"]["name"]) for o in objs}
            check(("Deployment", "proxy-operator") in names and ("ClusterRole", "proxy-agent") in names,
                  "names follow fullnameOverride")  # fmt: skip
            check(("ServiceAccount", "switchyard-agent") in names, "agent SA name is its own value")

        refuse("replicas: \"two\"", ["/operator/replicas", "want integer"],
               "-f", values_file(tmp, "two.yaml", 'operator:\n  replicas: "two"\n'))  # fmt: skip
        refuse("an unknown top-level key", ["additional properties 'replica' not allowed"],
               "-f", values_file(tmp, "unknown.yaml", "replica: 2\n"))  # fmt: skip
        refuse("an unknown nested key", ["/operator", "additional properties 'image_tag' not allowed"],
               "--set", "operator.image_tag=v1")  # fmt: skip
        refuse("defaultProxyConfig enabled without apiServer.host", ["/apiServer/host", "minLength"],
               "--set", "defaultProxyConfig.enabled=true")  # fmt: skip
        refuse("the same, schema skipped: the template check says why",
               ["defaultProxyConfig.enabled needs apiServer.host"],
               "--skip-schema-validation", "--set", "defaultProxyConfig.enabled=true")  # fmt: skip
        refuse("2 replicas without leader election", ["/operator/leaderElection", "must be true"],
               "--set", "operator.replicas=2", "--set", "operator.leaderElection=false")  # fmt: skip
        refuse("an unknown mode", ["/defaultProxyConfig/spec/mode", "ipvs"],
               "--set", "apiServer.host=10.0.0.1", "--set", "defaultProxyConfig.enabled=true",
               "--set", "defaultProxyConfig.spec.mode=ebpf")  # fmt: skip
        refuse("an API server URL instead of a host", ["/apiServer/host", "does not match pattern"],
               "--set", "apiServer.host=https://10.0.0.1:6443")  # fmt: skip
        refuse("a bad log level", ["/operator/logLevel", "must be one of"], "--set", "operator.logLevel=loud")

        print("\n== NOTES.txt (helm install --dry-run=client)")
        res = helm("install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client")
        check(res.returncode == 0, "dry-run install renders", res.stderr.strip())
        for want in ["kubectl apply -f", "kubectl get proxyconfig -w", "defaultProxyConfig.enabled=true",
                     "apiServer.host is not set", "kubectl apply --server-side --force-conflicts -f charts/switchyard/crds/"]:  # fmt: skip
            check(want in res.stdout, f"NOTES mention {want!r}")
        res = helm("install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client",
                   "--set", "defaultProxyConfig.enabled=true", "--set", "apiServer.host=10.0.0.10")  # fmt: skip
        check("kubectl get proxyconfig default -w" in res.stdout and "apiServer.host is not set" not in res.stdout,
              "NOTES with defaultProxyConfig: watch it, no warning")  # fmt: skip

    check_argocd_health()

    print()
    if failures:
        print(f"chart tests: {len(failures)} FAILED")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("chart tests: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
