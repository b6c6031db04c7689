"""The fleet recipes checked against the schemas of what runs them: the Kubernetes manifests against the
Kubernetes API's OpenAPI schemas, the compose file against the Compose Specification.

tests/test_recipes.py checks what the files must agree on with djsupervisor (grace periods, host names,
commands); this checks that Kubernetes and docker compose would accept them at all: a misspelt field
(`terminationGracePeriodSecond`) is silently dropped by a YAML parser and by `kubectl apply` without
`--validate=strict`, and the recipe would then stop pods after the default 30 s.

- Kubernetes: `kubernetes-validate` (pinned in the test extra: its release decides which schemas it bundles),
  strict (unknown fields are errors), against the oldest and newest API versions named in the README
  (KUBERNETES). kustomization.yaml is kustomize's, not an API kind: its resources must be the files checked
  here (`kubectl kustomize` builds it in test_recipes.py where kubectl is installed).
- Compose: the Compose Specification's JSON schema as `check-jsonschema` ships it (`--builtin-schema
  vendor.compose-spec`, vendored: no network at test time), YAML anchors and merge keys resolved as compose does.

Each check is also run on a deliberately broken copy, to show it can fail.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

FLEET = Path(__file__).resolve().parents[1] / "examples" / "fleet"
K8S = FLEET / "k8s"
COMPOSE = FLEET / "compose" / "docker-compose.yml"
#: The Kubernetes API versions the README says the manifests are validated against (oldest: cgroup v2 by
#: default, which the memory limit's reasoning assumes; newest: what kubernetes-validate 1.37.0 bundles).
KUBERNETES = ("1.28.0", "1.37.0")

pytestmark = pytest.mark.timeout(60)


def manifests() -> dict[str, dict]:
    """The Kubernetes objects the kustomization applies, by file name."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    documents = {}
    for name in kustomization["resources"]:
        (document,) = yaml.safe_load_all((K8S / name).read_text())
        documents[name] = document
    return documents


def test_the_kustomization_applies_exactly_the_manifests_checked():
    on_disk = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(manifests()) == on_disk
    assert sorted(d["kind"] for d in manifests().values()) == ["ConfigMap", "Deployment"]


@pytest.mark.parametrize("version", KUBERNETES)
def test_k8s_manifests_match_the_kubernetes_api_schema(version):
    for name, document in manifests().items():
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"k8s/{name} against Kubernetes {version}: {error.message} at {list(error.path)}")


def broken_k8s(documents: dict[str, dict]) -> list[tuple[str, dict, str]]:
    """Copies with one mistake each, and the word the validator's message must name."""
    deployment = copy.deepcopy(documents["deployment.yaml"])
    pod = deployment["spec"]["template"]["spec"]
    pod["terminationGracePeriodSecond"] = pod.pop("terminationGracePeriodSeconds")  # a typo: strict rejects it
    replicas = copy.deepcopy(documents["deployment.yaml"])
    replicas["spec"]["replicas"] = "two"
    configmap = copy.deepcopy(documents["configmap.yaml"])
    configmap["data"] = {"djsupervisor.toml": {"supervisor": {}}}  # a table where a string belongs
    return [
        ("deployment.yaml", deployment, "terminationGracePeriodSecond"),
        ("deployment.yaml", replicas, "two"),
        ("configmap.yaml", configmap, "string"),
    ]


@pytest.mark.parametrize("version", KUBERNETES)
def test_the_kubernetes_check_fails_on_a_broken_manifest(version):
    for name, document, word in broken_k8s(manifests()):
        with pytest.raises(kubernetes_validate.ValidationError) as raised:
            kubernetes_validate.validate(document, version, strict=True)
        assert word in raised.value.message, (name, raised.value.message)


def check_compose(path: Path) -> subprocess.CompletedProcess:
    """check-jsonschema with its vendored Compose Specification schema on `path`."""
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_compose_file_matches_the_compose_specification():
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validation done" in result.stdout


@pytest.mark.parametrize(
    ("mistake", "word"),
    [
        ({"stop_grace_periods": "75s"}, "stop_grace_periods"),  # a typo: compose would ignore the grace period
        ({"depends_on": {"seed": {"condition": "service_finished"}}}, "service_finished"),
    ],
)
def test_the_compose_check_fails_on_a_broken_file(tmp_path, mistake, word):
    data = yaml.safe_load(COMPOSE.read_text())  # anchors and merge keys resolved
    data["services"]["worker-a"].update(mistake)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(data))
    result = check_compose(broken)
    assert result.returncode == 1 and word in result.stdout, result.stdout + result.stderr
