#!/usr/bin/env bash
# Checks every install manifest under daemonset/ (CI runs it from .ci/run):
#  1. every kustomization (overlays/*, waypoint) renders with a real renderer, `kubectl kustomize`
#     (Debian's kubernetes-client, whose kustomize is v2, or any newer kubectl), and holds what it must;
#  2. every rendered object validates against the Kubernetes API schemas of each version in
#     KUBERNETES_VERSIONS with `kubernetes-validate --strict` (PyPI; an unknown field, a wrong type or a
#     kind without a schema fails);
#  3. istio/: the IstioOperator and the Helm values files name only fields Istio's installer and charts
#     have (no schema of them ships in a package; the field lists below are read off Istio's
#     operator/pkg/apis and manifests/charts/{ztunnel,istio-cni}/values.yaml).
# Exit: 0 all good, 1 something failed (each failure printed), 2 a tool is missing.
# Environment: KUBECTL (default kubectl), KUBERNETES_VERSIONS (default "1.30.0 1.34.0": 1.30 is the first
# with securityContext.appArmorProfile, which the CNI agent uses instead of the older annotation).
set -euo pipefail
cd "$(dirname "$0")"

KUBECTL=${KUBECTL:-kubectl}
VERSIONS=${KUBERNETES_VERSIONS:-"1.30.0 1.34.0"}
for tool in "$KUBECTL" python3; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "validate.sh: $tool not found (apt-get install kubernetes-client; pip install kubernetes-validate)" >&2
        exit 2
    fi
done
# The validator runs as a module, so no console-script shim has to be on PATH.
validate() { python3 -m kubernetes_validate "$@"; }
if ! python3 -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    echo "validate.sh: python3 cannot import kubernetes_validate (pip install kubernetes-validate)" >&2
    exit 2
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
failed=0
fail() {
    echo "FAIL $*" >&2
    failed=1
}

# What each kustomization must render (kind/namespace/name), beyond validating.
expect_for() {
    case "$1" in
    waypoint) echo "ServiceAccount//waypoint Deployment//waypoint Service//waypoint" ;;
    openshift) echo "DaemonSet/kube-system/ztunnel DaemonSet/kube-system/istio-cni-node ConfigMap/kube-system/istio-cni-config ClusterRole//ztunnel" ;;
    gke) echo "DaemonSet/istio-system/ztunnel DaemonSet/istio-system/istio-cni-node ResourceQuota/istio-system/ztunnel ResourceQuota/istio-system/istio-cni-resource-quota" ;;
    *) echo "DaemonSet/istio-system/ztunnel DaemonSet/istio-system/istio-cni-node ConfigMap/istio-system/istio-cni-config ServiceAccount/istio-system/ztunnel ServiceAccount/istio-system/istio-cni" ;;
    esac
}

echo "renderer: $("$KUBECTL" version --client 2>/dev/null | head -n1)"
echo "validator: kubernetes-validate $(validate --version), Kubernetes $VERSIONS"
rendered=0
for dir in overlays/*/ waypoint/; do
    dir=${dir%/}
    name=$(basename "$dir")
    before=$failed
    failed=0
    file="$out/$name.yaml"
    if ! "$KUBECTL" kustomize "$dir" >"$file" 2>"$out/$name.err"; then
        fail "$dir: kubectl kustomize failed:"
        cat "$out/$name.err" >&2
        failed=1
        continue
    fi
    # What was rendered, one kind/namespace/name per line.
    python3 - "$file" >"$out/$name.ids" <<'EOF' || { fail "$dir: rendered YAML unreadable"; continue; }
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d:
        m = d.get("metadata", {})
        print(f'{d["kind"]}/{m.get("namespace", "")}/{m["name"]}')
EOF
    for want in $(expect_for "$name"); do
        grep -qxF "$want" "$out/$name.ids" || fail "$dir: renders no $want"
    done
    for v in $VERSIONS; do
        if ! validate --strict --quiet -k "$v" "$file" >"$out/$name.log" 2>&1; then
            fail "$dir against Kubernetes $v:"
            cat "$out/$name.log" >&2
        elif grep -q "Couldn't find schema" "$out/$name.log"; then
            fail "$dir: a kind with no Kubernetes $v schema:"
            cat "$out/$name.log" >&2
        fi
    done
    if [ "$failed" = 0 ]; then
        echo "ok $dir: $(wc -l <"$out/$name.ids") objects"
        rendered=$((rendered + 1))
    fi
    failed=$((before | failed))
done

# 3. The files for Istio's own installer.
if ! python3 - istio/meshnode-ambient.yaml istio/ztunnel-values.yaml istio/cni-values.yaml <<'EOF'; then
import sys, yaml

# operator/pkg/apis/types.go: IstioOperatorSpec, IstioComponentSpec, ComponentSpec.
IOP_SPEC = {"profile", "installPackagePath", "namespace", "revision", "compatibilityVersion", "hub", "tag",
            "resourceSuffix", "meshConfig", "components", "values", "unvalidatedValues"}
COMPONENTS = {"base", "pilot", "cni", "ztunnel", "istiodRemote", "ingressGateways", "egressGateways"}
COMPONENT = {"enabled", "namespace", "hub", "tag", "k8s"}
# manifests/charts/ztunnel/values.yaml (top level) and operator's values_types.pb.go CNIConfig.
ZTUNNEL = {"hub", "tag", "variant", "image", "network", "global", "resourceName", "labels", "annotations",
           "volumeMounts", "volumes", "tolerations", "podAnnotations", "podLabels", "resources",
           "resourceQuotas", "peerCaCrl", "imagePullSecrets", "env", "imagePullPolicy", "multiCluster",
           "meshConfig", "terminationGracePeriodSeconds", "revision", "caAddress", "xdsAddress",
           "istioNamespace", "logLevel", "logAsJson", "seLinuxOptions", "resourceScope", "updateStrategy",
           "dnsPolicy", "dnsConfig", "profile", "platform", "nodeSelector", "affinity"}
CNI = {"enabled", "hub", "tag", "variant", "image", "pullPolicy", "cniBinDir", "cniConfDir", "cniConfFileName",
       "cniNetnsDir", "excludeNamespaces", "affinity", "env", "daemonSetLabels", "podAnnotations", "podLabels",
       "psp", "logLevel", "logging", "repair", "chained", "resource", "resources", "privileged",
       "seccompProfile", "ambient", "provider", "rollingMaxUnavailable", "istioOwnedCNIConfig",
       "istioOwnedCNIConfigFileName", "useAppArmorAnnotation", "profile", "global", "platform",
       "seLinuxOptions", "tolerations", "updateStrategy", "terminationGracePeriodSeconds",
       "resourceQuotas", "revision"}
CNI_AMBIENT = {"enabled", "configDir", "dnsCapture", "ipv6", "reconcileIptablesOnStartup",
               "enablementSelectors", "shareHostNetworkNamespace", "enableAmbientDetectionRetry"}

errors = []
def only(where, got, allowed):
    if not isinstance(got, dict):
        errors.append(f"{where}: expected a mapping, got {got!r}")
        return
    for k in sorted(set(got) - allowed):
        errors.append(f"{where}: unknown field {k!r}")

def check_cni(where, cni):
    only(where, cni, CNI)
    only(f"{where}.ambient", cni.get("ambient", {}), CNI_AMBIENT)
    if not isinstance(cni.get("ambient", {}).get("dnsCapture", True), bool):
        errors.append(f"{where}.ambient.dnsCapture: must be true or false")
    env = cni.get("env", {})
    for k, v in env.items():
        if not isinstance(v, str):
            errors.append(f"{where}.env.{k}: the chart quotes values, give a string")
    if "/" not in str(cni.get("image", "")):
        errors.append(f"{where}.image: a full image reference (with /) is what replaces istio-cni's")

def check_ztunnel(where, z):
    only(where, z, ZTUNNEL)
    if "/" not in str(z.get("image", "")):
        errors.append(f"{where}.image: a full image reference (with /) is what replaces ztunnel's")

iop_path, ztunnel_path, cni_path = sys.argv[1:4]
docs = [d for d in yaml.safe_load_all(open(iop_path)) if d]
if len(docs) != 1:
    errors.append(f"{iop_path}: expected one document, got {len(docs)}")
iop = docs[0] if docs else {}
if (iop.get("apiVersion"), iop.get("kind")) != ("install.istio.io/v1alpha1", "IstioOperator"):
    errors.append(f"{iop_path}: not an install.istio.io/v1alpha1 IstioOperator")
if not iop.get("metadata", {}).get("name"):
    errors.append(f"{iop_path}: metadata.name missing")
spec = iop.get("spec", {})
only(f"{iop_path}: spec", spec, IOP_SPEC)
if spec.get("profile") != "ambient":
    errors.append(f"{iop_path}: spec.profile must be ambient")
for name, c in spec.get("components", {}).items():
    if name not in COMPONENTS:
        errors.append(f"{iop_path}: spec.components.{name}: unknown component")
    elif isinstance(c, dict):
        only(f"{iop_path}: spec.components.{name}", c, COMPONENT)
values = spec.get("values", {})
check_ztunnel(f"{iop_path}: spec.values.ztunnel", values.get("ztunnel", {}))
check_cni(f"{iop_path}: spec.values.cni", values.get("cni", {}))
check_ztunnel(ztunnel_path, yaml.safe_load(open(ztunnel_path)) or {})
check_cni(cni_path, yaml.safe_load(open(cni_path)) or {})
for e in errors:
    print("FAIL", e, file=sys.stderr)
sys.exit(1 if errors else 0)
EOF
    failed=1
else
    echo "ok istio/: IstioOperator and Helm values name only Istio's fields"
fi

if [ "$rendered" = 0 ]; then
    fail "no kustomization rendered"
fi
if [ "$failed" != 0 ]; then
    echo "validate.sh: FAILED" >&2
    exit 1
fi
echo "validate.sh: every overlay rendered and validated"
