"""infra/k8s: every kustomization renders (without kubectl) and validates against a
pinned Kubernetes version, and the security properties the docs promise hold.

The renderer below implements the subset of Kustomize the manifests use (resources,
namespace, images, strategic-merge ``patches``) so CI needs no kubectl; keep the
manifests inside that subset (the test fails on any other kustomization field).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_module

yaml = require_module("yaml")
kubernetes_validate = require_module("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "infra" / "k8s"
# Pinned: the oldest minor still in upstream support when written, so the manifests
# also work on clusters that lag behind (preStop sleep needs >= 1.30).
KUBERNETES_VERSION = "1.33.0"
KUSTOMIZATIONS = ["base", "relay", "overlays/dev", "overlays/prod", "overlays/relay-prod"]
CLUSTER_SCOPED = {"Namespace"}
SUPPORTED_FIELDS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
# Strategic-merge keys for the lists the patches touch (as in the Kubernetes API).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
}


# --------------------------------------------------------------------- the renderer


def _merge(base: Any, patch: Any, key: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)  # strategic merge: null deletes
            elif k in out:
                out[k] = _merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        mk = MERGE_KEYS[key]
        out_list = [copy.deepcopy(x) for x in base]
        for item in patch:
            for i, existing in enumerate(out_list):
                if existing.get(mk) == item.get(mk):
                    out_list[i] = _merge(existing, item)
                    break
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)  # scalars, and lists without a merge key, are replaced


def _ident(doc: dict[str, Any]) -> tuple[str, str, str | None]:
    meta = doc.get("metadata", {})
    return doc["kind"], meta["name"], meta.get("namespace")


def _set_image(doc: dict[str, Any], images: list[dict[str, str]]) -> None:
    """Kustomize ``images``: match on the repository, replace its name and/or tag."""
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        repo, tag = c["image"], ""
        if ":" in repo.rsplit("/", 1)[-1]:
            repo, tag = repo.rsplit(":", 1)
        for img in images:
            if img["name"] == repo:
                tag = img.get("newTag", tag)
                c["image"] = img.get("newName", repo) + (f":{tag}" if tag else "")


def render(path: Path) -> list[dict[str, Any]]:
    """The resources ``kubectl kustomize PATH`` would print (for the subset we use)."""
    kfile = path / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    unknown = set(k) - SUPPORTED_FIELDS
    assert not unknown, f"{kfile}: renderer does not support {sorted(unknown)}"
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        target = (path / res).resolve()
        if target.is_dir():
            docs += render(target)
        else:
            docs += [d for d in yaml.safe_load_all(target.read_text()) if d]
    for entry in k.get("patches", []):
        assert set(entry) == {"path"}, f"{kfile}: only `patches: - path:` is supported"
        for patch in yaml.safe_load_all((path / entry["path"]).read_text()):
            if not patch:
                continue
            matches = [
                i
                for i, d in enumerate(docs)
                if _ident(d)[:2] == _ident(patch)[:2]
                and _ident(patch)[2] in (None, _ident(d)[2] or k.get("namespace"))
            ]
            assert len(matches) == 1, f"patch {_ident(patch)} matches {len(matches)} resources"
            docs[matches[0]] = _merge(docs[matches[0]], patch)
    for d in docs:
        if k.get("namespace") and d["kind"] not in CLUSTER_SCOPED:
            d.setdefault("metadata", {})["namespace"] = k["namespace"]
        _set_image(d, k.get("images", []))
    return docs


RENDERED = {name: render(K8S / name) for name in KUSTOMIZATIONS}
ALL = [(name, d) for name, docs in RENDERED.items() for d in docs]


def _pods(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    ]


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


# --------------------------------------------------------------------- the tests


def test_pinned_version_is_shipped() -> None:
    # Fails loudly if a kubernetes-validate upgrade drops the schemas we pin.
    d = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}}
    kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    "name,doc", ALL, ids=[f"{n}:{_ident(d)[0]}/{_ident(d)[1]}" for n, d in ALL]
)
def test_validates_against_pinned_kubernetes(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_yaml_file_is_used() -> None:
    """A manifest no kustomization reaches would escape validation."""
    used: set[Path] = set()
    for name in KUSTOMIZATIONS:
        kdir = K8S / name
        k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
        used.add(kdir / "kustomization.yaml")
        used |= {(kdir / r).resolve() for r in k.get("resources", [])}
        used |= {(kdir / p["path"]).resolve() for p in k.get("patches", [])}
    for f in K8S.rglob("*.yaml"):
        assert f.resolve() in used, f"{f.relative_to(ROOT)} is in no kustomization"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_pods_are_hardened(name: str) -> None:
    for pod_name, tmpl in _pods(RENDERED[name]):
        spec = tmpl["spec"]
        pod_sc = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, pod_name
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", pod_name
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = {**pod_sc, **c.get("securityContext", {})}
            where = f"{name}:{pod_name}/{c['name']}"
            assert sc.get("runAsNonRoot") is True, where
            assert sc.get("runAsUser", 0) != 0, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("privileged") in (None, False), where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: {kind}"
            assert "livenessProbe" in c and "readinessProbe" in c, where
            if "openpcc" in c["image"]:
                assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", where
                assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", where
                ann = tmpl["metadata"].get("annotations", {})
                assert ann.get("prometheus.io/scrape") == "true", where
                assert ann.get("prometheus.io/path") == "/metrics", where
                ports = {str(p["containerPort"]) for p in c["ports"]}
                assert ann.get("prometheus.io/port") in ports, where
                assert c["image"].startswith("ghcr.io/openpcc/openpcc:"), where


def test_key_folders_are_shared_read_only_in_production() -> None:
    docs = RENDERED["overlays/prod"]
    for kind, name, vol, secret in (
        ("Deployment", "issuer", "token-keys", "openpcc-issuer-keys"),
        ("Deployment", "gateway", "ohttp-keys", "openpcc-gateway-ohttp-keys"),
    ):
        spec = _find(docs, kind, name)["spec"]["template"]["spec"]
        (v,) = [v for v in spec["volumes"] if v["name"] == vol]
        assert v["secret"]["secretName"] == secret
        (m,) = [m for c in spec["containers"] for m in c["volumeMounts"] if m["name"] == vol]
        assert m["readOnly"] is True and "subPath" not in m  # subPath never updates
    # Node admission: credentials and the release manifest, one read-only folder, no
    # subPath (the gateway rereads both when the kubelet swaps them).
    spec = _find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    (v,) = [v for v in spec["volumes"] if v["name"] == "node-admission"]
    names = {next(iter(src.values()))["name"] for src in v["projected"]["sources"]}
    assert names == {"openpcc-node-credentials", "openpcc-release"}
    (m,) = [m for c in spec["containers"] for m in c["volumeMounts"]
            if m["name"] == "node-admission"]  # fmt: skip
    assert m["readOnly"] is True and "subPath" not in m


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_services_and_pdbs_select_pods(name: str) -> None:
    docs = RENDERED[name]
    pods = [
        (d["metadata"].get("namespace"), tmpl)
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        for tmpl in [d["spec"]["template"]]
    ]

    def selects(ns: str | None, selector: dict[str, str]) -> list[dict[str, Any]]:
        return [
            t
            for pns, t in pods
            if pns == ns
            and all(
                t["metadata"]["labels"].get(k) == v
                for k, v in selector.items()
                if k != "statefulset.kubernetes.io/pod-name"  # set by the controller
            )
        ]

    for d in docs:
        ns = d["metadata"].get("namespace")
        if d["kind"] == "Service":
            matched = selects(ns, d["spec"]["selector"])
            assert matched, f"Service {d['metadata']['name']} selects no pod"
            names = {p.get("name") for t in matched for c in t["spec"]["containers"]
                     for p in c["ports"]}  # fmt: skip
            for port in d["spec"]["ports"]:
                assert port["targetPort"] in names, f"{d['metadata']['name']}: {port}"
        if d["kind"] == "PodDisruptionBudget":
            assert selects(ns, d["spec"]["selector"]["matchLabels"]), d["metadata"]["name"]
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] != "redis":
            pdbs = [
                p
                for p in docs
                if p["kind"] == "PodDisruptionBudget"
                and p["spec"]["selector"]["matchLabels"].items()
                <= d["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert pdbs, f"{name}: no PodDisruptionBudget for {d['metadata']['name']}"


@pytest.mark.parametrize("name", ["base", "overlays/dev", "overlays/prod"])
def test_gateway_is_one_deployment_with_one_internal_service(name: str) -> None:
    """The node registry is shared through Redis: replicas are interchangeable, so nodes
    register through one Service and scaling is ``kubectl scale deployment/gateway``."""
    docs = RENDERED[name]
    gw = _find(docs, "Deployment", "gateway")
    assert not [
        d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "gateway"
    ]
    # The shared registry (and spent store) is on: every replica points at the same Redis.
    config = _find(docs, "ConfigMap", "openpcc-gateway")["data"]
    assert config["OPENPCC_GATEWAY_REDIS"].startswith("redis://redis:")
    (env_from,) = gw["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert env_from["configMapRef"]["name"] == "openpcc-gateway"
    # Exactly one Service reaches the internal listener, and it selects every replica.
    internal = [
        d
        for d in docs
        if d["kind"] == "Service" and any(p["targetPort"] == "internal" for p in d["spec"]["ports"])
    ]
    assert [d["metadata"]["name"] for d in internal] == ["gateway-internal"]
    for d in docs:
        if d["kind"] == "Service":
            assert "statefulset.kubernetes.io/pod-name" not in d["spec"]["selector"]
    (svc,) = internal
    assert svc["spec"]["selector"] == {"app.kubernetes.io/name": "gateway"}
    if name == "overlays/prod":
        # Internal LoadBalancer, open to the node subnet only, source address kept so
        # the NetworkPolicy's ipBlock sees the node.
        assert svc["spec"]["type"] == "LoadBalancer"
        assert svc["spec"]["loadBalancerSourceRanges"] == ["10.20.0.0/16"]
        assert svc["spec"]["externalTrafficPolicy"] == "Local"
        assert svc["metadata"]["annotations"]["networking.gke.io/load-balancer-type"] == "Internal"
        assert gw["spec"]["replicas"] >= 2
        # A rollout never drops below the replicas the PDB protects.
        assert gw["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        pdb = _find(docs, "PodDisruptionBudget", "gateway")
        assert pdb["spec"]["maxUnavailable"] < gw["spec"]["replicas"]


def _egress_peers(policy: dict[str, Any]) -> set[str]:
    """Each egress destination, as 'app:<label>', 'cidr:<block>' or 'dns'."""
    out = set()
    for rule in policy["spec"].get("egress", []):
        ports = {p["port"] for p in rule.get("ports", [])}
        for peer in rule.get("to", []):
            if "ipBlock" in peer:
                out.add(f"cidr:{peer['ipBlock']['cidr']}")
            elif peer.get("podSelector", {}).get("matchLabels", {}).get("k8s-app") == "kube-dns":
                assert ports == {53}
                out.add("dns")
            else:
                out.add("app:" + peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"])
    return out


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_network_policies(name: str) -> None:
    docs = RENDERED[name]
    pols = {
        (d["metadata"]["namespace"], d["metadata"]["name"]): d
        for d in docs
        if d["kind"] == "NetworkPolicy"
    }
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for w in workloads:
        ns, app = w["metadata"]["namespace"], w["metadata"]["name"]
        assert (ns, "default-deny") in pols, f"{name}: no default deny in {ns}"
        assert (ns, app) in pols, f"{name}: no NetworkPolicy for {app}"
        pol = pols[(ns, app)]
        assert set(pol["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        assert pol["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == app
    expected = {
        "issuer": {"app:redis", "dns"},
        "gateway": {"cidr:10.20.0.0/16", "app:issuer", "app:redis", "dns"},
        "redis": set(),
    }
    for (_ns, app), pol in pols.items():
        if app in expected:
            assert _egress_peers(pol) == expected[app], f"{name}: {app} egress"
        if app == "relay":
            peers = _egress_peers(pol)
            assert "dns" in peers and len(peers) == 2, f"{name}: relay egress {peers}"
            assert peers - {"dns"} <= {"app:gateway", "cidr:203.0.113.10/32"}


def test_relay_is_separate_from_the_operator() -> None:
    """The relay never shares a namespace, Secret or ConfigMap with gateway or issuer."""
    for name in KUSTOMIZATIONS:
        for d in RENDERED[name]:
            ns = d["metadata"].get("namespace")
            is_relay = d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "relay"
            if d["kind"] == "Deployment" and d["metadata"]["name"] == "relay":
                assert ns == "openpcc-relay"
                assert "secret" not in yaml.safe_dump(d["spec"]).lower()
            elif is_relay:
                assert ns == "openpcc-relay"
            elif d["kind"] != "Namespace" and ns == "openpcc-relay":
                assert d["kind"] == "NetworkPolicy", d["metadata"]["name"]
    assert not any(d["kind"] == "Secret" for d in RENDERED["overlays/prod"])


def test_config_keys_are_real_flags() -> None:
    """Every OPENPCC_* variable a ConfigMap sets is one the service's `serve` reads: its
    --help names each variable it reads (the config kit writes them from one dataclass)."""
    import argparse

    from openpcc.cli import build_parser

    groups = {"ISSUER": "issuer", "GATEWAY": "gateway", "RELAY": "relay"}
    root = build_parser()

    def serve_help(group: str) -> str:
        sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
        party = sub.choices[group]
        inner = next(a for a in party._actions if isinstance(a, argparse._SubParsersAction))
        return " ".join(inner.choices["serve"].format_help().split())

    helps = {party: serve_help(group) for party, group in groups.items()}
    for name in KUSTOMIZATIONS:
        for d in RENDERED[name]:
            if d["kind"] != "ConfigMap":
                continue
            for key in d["data"]:
                party = key.removeprefix("OPENPCC_").partition("_")[0]
                assert key in helps[party], f"{key} is read by nobody"


def test_secrets_referenced_exist_in_dev() -> None:
    docs = RENDERED["overlays/dev"]
    secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    for _, tmpl in _pods(docs):
        for c in tmpl["spec"]["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets
        for v in tmpl["spec"].get("volumes", []):
            assert "secret" not in v, "dev generates keys; it mounts no key Secret"
            # A projected volume's Secrets (the node credentials) must be in dev too.
            for src in v.get("projected", {}).get("sources", []):
                if "secret" in src:
                    assert src["secret"]["name"] in secrets, src
                    assert "keys" not in src["secret"]["name"], "dev generates keys"
