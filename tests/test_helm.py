"""The Helm chart helm/iris-drs rendered and linted by Helm itself, its objects checked against
the Kubernetes schemas.

Helm's own Go engine (Helm v4 SDK) runs in-process through the ``helm-python-sdk`` wheel: no
``helm`` binary. Every rendered manifest is validated, strictly (unknown fields are errors),
against the Kubernetes schemas that ship inside the ``kubernetes-validate`` wheel, for the oldest
Kubernetes the chart supports (Chart.yaml ``kubeVersion``) and the newest the wheel knows.

The official Apache Airflow chart (the ``airflow`` dependency) cannot be fetched here, so:

- the project's own templates are rendered with the dependency absent, which is how Helm renders
  a chart whose ``charts/`` is empty;
- ``helm lint`` of the chart as it is reports exactly one finding, the missing ``airflow``
  dependency; a copy of the chart without the dependency entry lints clean in strict mode;
- the values handed to the official chart (``airflow:``) are checked against a sourced extract
  of its values schema (helm/reference/, Kubernetes types resolved to the Kubernetes schemas),
  the Airflow configuration they set against Airflow's own option list, and the pods the
  official chart builds from them (worker + compute sidecar, api-server, triggerer) are
  assembled from those values and validated as Kubernetes Pods.

The tests skip only where the two wheels cannot be installed; with ``CI`` set they must run.
"""

from __future__ import annotations

import base64
import copy
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml


def _require(module: str, package: str):
    """Import ``module``; skip without it, except under CI, which installs the test extra."""
    try:
        return __import__(module)
    except ImportError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(
            f"{package} is not installed ({exc}); `pip install -e .[test]` brings it",
            allow_module_level=True,
        )


helm = _require("helm_python", "helm-python-sdk")
kubernetes_validate = _require("kubernetes_validate", "kubernetes-validate")

import jsonschema  # noqa: E402  (after the skip: kubernetes-validate depends on it)
from referencing import Registry, Resource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "iris-drs"
AIRFLOW_EXTRACT = ROOT / "helm" / "reference" / "airflow-chart-values.extract.schema.json"
RELEASE = "iris"
NAMESPACE = "iris"


def _kube_versions() -> list[str]:
    """The oldest Kubernetes the chart supports and the newest the validator knows."""
    declared = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    oldest = re.match(r">=\s*(\d+\.\d+)", declared).group(1)
    newest = re.match(r"\d+\.\d+", kubernetes_validate.latest_version()).group(0)
    return [oldest, newest]


KUBE_VERSIONS = _kube_versions()


# --------------------------------------------------------------------------- helpers
@dataclass
class Rendered:
    """One ``helm template``: the Kubernetes objects per template file and the NOTES text."""

    by_template: dict[str, list[dict]]
    notes: str

    @property
    def objects(self) -> list[dict]:
        return [d for docs in self.by_template.values() for d in docs]

    def get(self, kind: str, name: str) -> dict:
        found = [d for d in self.objects if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
        return found[0]


def render(chart, values: dict | None = None) -> Rendered:
    """Render ``chart`` with Helm's engine (as ``helm template iris helm/iris-drs -n iris``)."""
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    by_template: dict[str, list[dict]] = {}
    notes = ""
    for path, text in manifests.items():
        template = path.split("/templates/", 1)[1]
        if template == "NOTES.txt":
            notes = text
        else:
            by_template[template] = [d for d in yaml.safe_load_all(text) if d]
    return Rendered(by_template, notes)


def secret_value(secret: dict, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def overlay() -> dict:
    """values-kubernetes-executor.yaml as Helm parses a ``-f`` file."""
    text = (CHART / "values-kubernetes-executor.yaml").read_text()
    return helm.values_from_yaml(text)


# Value sets every rendering test runs with: the defaults, the KubernetesExecutor overlay, the
# secrets managed outside the chart, a ledger on its own server, a named storage class.
VARIANTS: dict[str, Any] = {
    "defaults": None,
    "kubernetes-executor": "overlay",
    "existing-secrets": {"iris": {k: {"create": False} for k in ("database", "ledger", "broker", "s3")}},
    "own-ledger": {"iris": {"ledger": {"url": "postgresql+psycopg2://iris:pw@ledger-db.iris.svc:5432/iris_ledger",
                                       "schema": ""}}},
    "storage-class": {"iris": {"crdsCache": {"storageClassName": "cephfs"}, "state": {"storageClassName": "cephfs"}}},
}


def variant_values(name: str) -> dict | None:
    value = VARIANTS[name]
    return overlay() if value == "overlay" else copy.deepcopy(value)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def values(chart) -> dict:
    """The chart's default values as Helm reads values.yaml."""
    return chart.values


@pytest.fixture(scope="module")
def rendered(chart) -> Rendered:
    return render(chart)


# --------------------------------------------------------------------------- Helm itself
def test_helm_engine_is_helms_go_sdk():
    assert helm.helm_sdk_version().startswith("v4."), helm.helm_sdk_version()


def test_chart_metadata_as_helm_loads_it(chart):
    meta = chart.metadata
    assert meta["name"] == "iris-drs" and meta["apiVersion"] == "v2"
    (dep,) = meta["dependencies"]
    assert (dep["name"], dep["condition"]) == ("airflow", "airflow.enabled")
    assert dep["repository"] == "https://airflow.apache.org"
    # Not fetched here (no network): Helm renders the chart's own templates without it.
    assert chart.dependencies == []
    assert [d["status"] for d in helm.dependency_list(CHART)] == ["missing"]


@pytest.mark.parametrize("variant", ["defaults", "kubernetes-executor"])
def test_values_match_schema(chart, variant):
    chart.validate_schema(variant_values(variant))


@pytest.mark.parametrize(
    ("patch", "named"),
    [
        ({"airflow": {"executor": "SequentialExecutor"}}, "at '/airflow/executor'"),
        ({"iris": {"s3": {"endpointUrl": "seaweed:8333"}}}, "at '/iris/s3/endpointUrl'"),
        ({"iris": {"database": {"url": "mysql://x"}}}, "at '/iris/database"),
        ({"iris": {"ledger": {"url": "sqlite:////opt/iris/state/ledger.sqlite"}}}, "at '/iris/ledger"),
        ({"iris": {"ledger": {"schema": "Iris-Ledger"}}}, "at '/iris/ledger"),
        ({"iris": {"env": {"lower_case": "x"}}}, "propertyName 'lower_case'"),
        ({"iris": {"unknown": 1}}, "additional properties 'unknown' not allowed"),
        ({"airflow": {"workers": {"resources": {"requests": {"cpu": "lots"}}}}}, "at '/airflow/workers/resources"),
    ],
)
def test_schema_rejects_bad_values(chart, patch, named):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(patch)
    assert named in str(err.value), str(err.value)
    # `helm template` / `helm install` refuse the same values before rendering anything.
    with pytest.raises(helm.HelmValuesError):
        chart.render(patch, name=RELEASE, namespace=NAMESPACE)


def _lint_findings(report: dict) -> list[tuple[int, str]]:
    """Warnings and errors (severity >= 2) of a ``helm lint`` report."""
    return [(m["severity"], m["error"]) for m in report["messages"] if m["severity"] >= 2]


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_helm_lint_reports_only_the_unfetched_dependency(kube_version):
    report = helm.lint(CHART, namespace=NAMESPACE, kube_version=f"v{kube_version}.0")
    assert _lint_findings(report) == [(2, "chart directory is missing these dependencies: airflow")]


@pytest.fixture(scope="module")
def chart_without_dependency(tmp_path_factory) -> Path:
    """A copy of the chart whose Chart.yaml drops the `airflow` dependency entry."""
    copy_dir = tmp_path_factory.mktemp("chart") / "iris-drs"
    shutil.copytree(CHART, copy_dir)
    meta = yaml.safe_load((copy_dir / "Chart.yaml").read_text())
    del meta["dependencies"]
    (copy_dir / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return copy_dir


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_helm_lint_strict_is_clean_without_the_dependency(chart_without_dependency, variant, kube_version):
    report = helm.lint(chart_without_dependency, variant_values(variant), strict=True,
                       namespace=NAMESPACE, kube_version=f"v{kube_version}.0")
    assert report["total_charts_linted"] == 1
    assert _lint_findings(report) == [], report["messages"]


def test_helm_lint_can_fail(chart_without_dependency):
    report = helm.lint(chart_without_dependency, {"iris": {"s3": {"bucket": "Not_A_Bucket"}}},
                       strict=True, namespace=NAMESPACE)
    assert any(sev == 3 and "/iris/s3/bucket" in msg for sev, msg in _lint_findings(report))


def test_packaged_chart_leaves_the_image_build_out_and_renders_the_same(chart, chart_without_dependency, tmp_path):
    # `helm package` refuses a chart whose dependency is not in charts/: package the copy.
    archive = helm.package(chart_without_dependency, destination=tmp_path)
    assert Path(archive).name == "iris-drs-0.1.0.tgz"
    with helm.Chart.load(archive) as packaged:
        names = {f["name"] for f in packaged.files} | {t["name"] for t in packaged.templates}
        assert "values-kubernetes-executor.yaml" in names
        assert not {"Dockerfile", "Dockerfile.dockerignore"} & names  # .helmignore
        assert render(packaged).by_template == render(chart).by_template


# --------------------------------------------------------------------------- Kubernetes schemas
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_rendered_manifest_is_a_valid_kubernetes_object(chart, variant, kube_version):
    objects = render(chart, variant_values(variant)).objects
    assert objects or variant == "existing-secrets"
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {kube_version}): {where}: {exc.message}")


def test_kubernetes_validation_can_fail():
    bad = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"A": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[0], strict=True)
    unknown_field = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "dta": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown_field, KUBE_VERSIONS[0], strict=True)


# --------------------------------------------------------------------------- the chart's objects
def test_chart_renders_the_expected_objects(rendered, values):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered.objects)
    assert kinds == [
        ("ConfigMap", "iris-drs-env"),
        ("PersistentVolumeClaim", "iris-drs-crds-cache"),
        ("PersistentVolumeClaim", "iris-drs-state"),
        ("Secret", "iris-drs-airflow-broker"),
        ("Secret", "iris-drs-airflow-metadata"),
        ("Secret", "iris-drs-ledger"),
        ("Secret", "iris-drs-s3-connection"),
    ]
    for d in rendered.objects:
        assert d["apiVersion"] == "v1"
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "iris-drs-0.1.0"
    conn = json.loads(secret_value(rendered.get("Secret", "iris-drs-s3-connection"), "AIRFLOW_CONN_IRIS_S3"))
    assert conn["conn_type"] == "aws"
    assert conn["extra"]["endpoint_url"] == values["iris"]["s3"]["endpointUrl"]
    assert conn["login"] == values["iris"]["s3"]["accessKeyId"]
    meta = secret_value(rendered.get("Secret", "iris-drs-airflow-metadata"), "connection")
    assert meta == values["iris"]["database"]["url"]
    env = rendered.get("ConfigMap", "iris-drs-env")["data"]
    assert json.loads(env["AIRFLOW__OPENLINEAGE__TRANSPORT"])["type"] == "http"
    assert env["CRDS_PATH"] == values["iris"]["crdsCache"]["mountPath"]
    # The variables iris_tasks.config reads.
    assert env["IRIS_STATE_DIR"] == values["iris"]["state"]["mountPath"]
    assert env["IRIS_LANDING"] == "s3://iris-drs/landing/"
    assert env["IRIS_STORE_URL"] == "s3://iris-drs?conn_id=iris_s3"
    assert env["IRIS_OBSERVATORY"] == "tmt"
    # The frame ledger: PostgreSQL, by default the metadata database, in its own schema.
    ledger_url = secret_value(rendered.get("Secret", "iris-drs-ledger"), "IRIS_LEDGER_URL")
    assert ledger_url == values["iris"]["database"]["url"]
    assert env["IRIS_LEDGER_SCHEMA"] == values["iris"]["ledger"]["schema"] == "iris_ledger"
    assert "IRIS_LEDGER_URL" not in env  # carries a password: secret only
    assert all(isinstance(v, str) for v in env.values())  # ConfigMap data must be strings
    for pvc in (d for d in rendered.objects if d["kind"] == "PersistentVolumeClaim"):
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert "storageClassName" not in pvc["spec"]  # "" in values: the cluster's default class


def test_storage_class_is_rendered_when_named(chart):
    for pvc in (d for d in render(chart, variant_values("storage-class")).objects
                if d["kind"] == "PersistentVolumeClaim"):
        assert pvc["spec"]["storageClassName"] == "cephfs"


def test_notes_name_the_release_and_the_landing_area(rendered):
    assert f"installed as release {RELEASE} (CeleryExecutor)" in rendered.notes
    assert f"svc/{RELEASE}-api-server" in rendered.notes and f"--namespace {NAMESPACE}" in rendered.notes
    assert "s3://iris-drs/landing/ at http://seaweedfs-s3.storage.svc:8333" in rendered.notes


def test_notes_warn_while_secrets_hold_the_placeholder_password(chart, rendered):
    assert "placeholder password CHANGE-ME" in rendered.notes
    assert ("iris.database.url, iris.broker.url, iris.ledger.url (empty: iris.database.url), "
            "iris.s3.secretAccessKey") in rendered.notes
    real = {"iris": {"database": {"url": "postgresql://airflow:pw1@db.iris.svc:5432/airflow"},
                     "broker": {"url": "redis://:pw2@redis.iris.svc:6379/0"},
                     "s3": {"secretAccessKey": "pw3"}}}
    assert "CHANGE-ME" not in render(chart, real).notes
    assert "CHANGE-ME" not in render(chart, variant_values("existing-secrets")).notes
    # No broker with the KubernetesExecutor: its placeholder does not matter.
    assert "iris.broker.url" not in render(chart, overlay()).notes


def test_ledger_url_renders_from_its_own_value(chart):
    out = render(chart, variant_values("own-ledger"))
    url = VARIANTS["own-ledger"]["iris"]["ledger"]["url"]
    assert secret_value(out.get("Secret", "iris-drs-ledger"), "IRIS_LEDGER_URL") == url
    env = out.get("ConfigMap", "iris-drs-env")["data"]
    assert "IRIS_LEDGER_SCHEMA" not in env  # no schema: the URL's search_path (public)
    # What the pods' settings make of that environment: the database, driver suffix dropped.
    from iris_tasks.config import _ledger_url
    from iris_tasks.orchestration.ledger import parse_location

    loc = parse_location(_ledger_url(url, env.get("IRIS_LEDGER_SCHEMA")))
    assert loc.is_postgres and loc.schema is None
    assert loc.dsn == "postgresql://iris:pw@ledger-db.iris.svc:5432/iris_ledger"


def test_kubernetes_executor_overlay_drops_broker(chart):
    out = render(chart, overlay())
    names = {d["metadata"]["name"] for d in out.objects}
    assert "iris-drs-airflow-broker" not in names
    assert "iris-drs-s3-connection" in names
    assert "(KubernetesExecutor)" in out.notes


def test_existing_secrets_are_not_overwritten(chart):
    out = render(chart, variant_values("existing-secrets"))
    assert out.by_template["secrets.yaml"] == []
    assert {d["kind"] for d in out.objects} == {"ConfigMap", "PersistentVolumeClaim"}


# --------------------------------------------------------------------------- the official chart's side
def test_names_shared_with_the_airflow_subchart_agree(values):
    iris, af = values["iris"], values["airflow"]
    assert af["data"]["metadataSecretName"] == iris["database"]["secretName"]
    assert af["data"]["brokerUrlSecretName"] == iris["broker"]["secretName"]
    env_from = yaml.safe_load(af["extraEnvFrom"])
    assert {"secretRef": {"name": iris["s3"]["secretName"]}} in env_from
    assert {"secretRef": {"name": iris["ledger"]["secretName"]}} in env_from
    assert {"configMapRef": {"name": iris["configMapName"]}} in env_from
    claims = {iris["crdsCache"]["claimName"]: iris["crdsCache"]["mountPath"],
              iris["state"]["claimName"]: iris["state"]["mountPath"]}
    needs = {"workers": set(claims), "apiServer": set(claims), "triggerer": {iris["state"]["claimName"]}}
    for component, wanted in needs.items():
        vols = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in af[component]["extraVolumes"]
                if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for m in af[component]["extraVolumeMounts"]}
        assert set(vols.values()) == wanted, component
        for vol_name, claim in vols.items():
            assert mounts[vol_name] == claims[claim], (component, vol_name)
    assert af["images"]["airflow"]["repository"] == iris["image"]["repository"]
    assert af["images"]["airflow"]["tag"] == iris["image"]["tag"]
    assert af["dags"]["gitSync"]["enabled"] is False  # DAGs are baked into the image


def test_versions_agree_with_project_and_dockerfile(values, chart):
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'apache-airflow\[[^\]]*\]==([0-9.]+)', pyproject).group(1)
    assert values["airflow"]["airflowVersion"] == pinned
    dockerfile = (CHART / "Dockerfile").read_text()
    assert f"ARG AIRFLOW_VERSION={pinned}" in dockerfile
    assert "COPY --chown=airflow:root dags/ /opt/airflow/dags/" in dockerfile
    assert "COPY --chown=airflow:root plugins/ /opt/airflow/plugins/" in dockerfile
    assert chart.metadata["appVersion"] == values["iris"]["image"]["tag"]


@cache
def _official_values_validator(kube_version: str) -> jsonschema.Draft202012Validator:
    """The extract of the official chart's schema, Kubernetes types from kubernetes-validate."""
    extract = json.loads(AIRFLOW_EXTRACT.read_text())
    jsonschema.Draft202012Validator.check_schema(extract)
    schemas = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    definitions = json.loads((schemas / f"v{kube_version}.0-local-strict" / "_definitions.json").read_text())
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    return jsonschema.Draft202012Validator(extract, registry=registry)


def _schema_errors(validator, instance) -> list[str]:
    return [f"airflow.{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(instance)]


def test_extract_of_the_official_schema_is_sourced():
    extract = json.loads(AIRFLOW_EXTRACT.read_text())
    assert re.search(r"apache/airflow, file chart/values\.schema\.json, read at commit [0-9a-f]{40}",
                     extract["$comment"])


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", ["defaults", "kubernetes-executor"])
def test_values_passed_to_the_official_chart_match_its_schema(chart, variant, kube_version):
    # merge_values: what Helm hands the subchart, overlay nulls deleting keys included.
    airflow_values = chart.merge_values(variant_values(variant))["airflow"]
    assert _schema_errors(_official_values_validator(kube_version), airflow_values) == []


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        ({"data": {"brokerUrlSecretNme": "x"}}, "airflow.data"),  # a typo the official chart refuses
        ({"executor": "Celery"}, "airflow.executor"),
        ({"workers": {"replicas": "two"}}, "airflow.workers.replicas"),
        ({"workers": {"extraContainers": [{"name": "iris-compute", "command": "python -m x"}]}},
         "airflow.workers.extraContainers.0.command"),
        ({"apiServer": {"extraVolumeMounts": [{"name": "x", "mountPath": "/x", "readonly": True}]}},
         "airflow.apiServer.extraVolumeMounts.0"),
        ({"config": {"logging": {"remote_logging": ["True"]}}}, "airflow.config.logging.remote_logging"),
    ],
)
def test_official_schema_extract_rejects_bad_values(values, patch, where):
    bad = copy.deepcopy(values["airflow"])
    for key, sub in patch.items():
        bad[key] = {**bad.get(key, {}), **sub} if isinstance(sub, dict) and isinstance(bad.get(key), dict) else sub
    errors = _schema_errors(_official_values_validator(KUBE_VERSIONS[0]), bad)
    assert any(e.startswith(where + ":") for e in errors), errors


@cache
def _airflow_config_options() -> dict[str, set[str]]:
    """Every [section] option Airflow 3.3.2 and the installed providers document.

    Read from the packages' own configuration descriptions (core config.yml and each provider's
    get_provider_info), without importing airflow, which would write an airflow.cfg."""
    airflow_root = importlib.resources.files("airflow")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    sections = yaml.load((airflow_root / "config_templates" / "config.yml").read_text(), Loader=loader)
    options = {name: set(body.get("options", {})) for name, body in sections.items()}
    for info in sorted(Path(str(airflow_root / "providers")).glob("*/get_provider_info.py")):
        spec = importlib.util.spec_from_file_location(f"_provider_info_{info.parent.name}", info)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name, body in module.get_provider_info().get("config", {}).items():
            options.setdefault(name, set()).update(body.get("options", {}))
    return options


def test_airflow_config_set_by_the_chart_exists_in_airflow(values):
    known = _airflow_config_options()
    unknown = [f"[{section}] {key}" for section, body in values["airflow"]["config"].items()
               for key in body if key not in known.get(section, set())]
    assert unknown == [], f"not options of Airflow {values['airflow']['airflowVersion']}: {unknown}"
    assert "remote_logging" in known["logging"] and "worker_concurrency" in known["celery"]
    assert "no_such_option" not in known["core"]


# --------------------------------------------------------------------------- topology
def _pod(name: str, image: str, env_from: list, component: dict, main_args: list[str]) -> dict:
    """The pod the official chart builds for a component: its container with the chart-wide
    envFrom, the component's extraVolumeMounts and resources, its extraContainers and
    extraVolumes (the official chart's own volumes left out)."""
    main = {"name": name, "image": image, "args": main_args, "envFrom": env_from,
            "volumeMounts": component.get("extraVolumeMounts", [])}
    if "resources" in component:
        main["resources"] = component["resources"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{RELEASE}-{name}"},
            "spec": {"containers": [main, *component.get("extraContainers", [])],
                     "volumes": component.get("extraVolumes", [])}}


def _component_pods(merged: dict) -> dict[str, dict]:
    af = merged["airflow"]
    image = f"{af['images']['airflow']['repository']}:{af['images']['airflow']['tag']}"
    env_from = yaml.safe_load(af["extraEnvFrom"])
    return {
        "worker": _pod("worker", image, env_from, af["workers"], ["airflow", "celery", "worker"]),
        "api-server": _pod("api-server", image, env_from, af["apiServer"], ["airflow", "api-server"]),
        "triggerer": _pod("triggerer", image, env_from, af["triggerer"], ["airflow", "triggerer"]),
    }


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", ["defaults", "kubernetes-executor"])
def test_component_pods_are_valid_and_mount_only_declared_volumes(chart, variant, kube_version):
    for component, pod in _component_pods(chart.merge_values(variant_values(variant))).items():
        kubernetes_validate.validate(pod, kube_version, strict=True)
        declared = {v["name"] for v in pod["spec"]["volumes"]}
        for container in pod["spec"]["containers"]:
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounted <= declared, (component, container["name"], mounted - declared)
        assert len(declared) == len(pod["spec"]["volumes"]), component  # no duplicate names


def test_topology_matches_the_local_cluster(values, rendered):
    """Celery workers with the compute sidecar, PostgreSQL, Redis, the object store from a
    Secret, remote logging: what the official chart is told, and what it finds rendered."""
    iris, af = values["iris"], values["airflow"]
    assert af["executor"] == "CeleryExecutor" and af["workers"]["replicas"] >= 2
    assert [c["name"] for c in af["workers"]["extraContainers"]] == ["iris-compute"]
    # PostgreSQL and Redis are external services; the official chart reads their URLs from
    # these secrets, key `connection`, and must not start its own.
    assert af["postgresql"]["enabled"] is False and af["redis"]["enabled"] is False
    metadata = rendered.get("Secret", af["data"]["metadataSecretName"])
    assert secret_value(metadata, "connection").startswith("postgresql://")
    broker = rendered.get("Secret", af["data"]["brokerUrlSecretName"])
    assert re.match(r"rediss?://", secret_value(broker, "connection"))
    # Celery's result backend: with Airflow >= 2.4 and no data.resultBackend* the official chart
    # writes no result-backend secret of its own (which would point at its bundled PostgreSQL)
    # and Celery falls back to the metadata database (db+ + sql_alchemy_conn).
    assert not {"resultBackendSecretName", "resultBackendConnection"} & set(af["data"])
    assert tuple(int(x) for x in af["airflowVersion"].split(".")[:2]) >= (2, 4)
    # The object store: a connection in a Secret, in every Airflow container's environment.
    s3_secret = rendered.get("Secret", iris["s3"]["secretName"])
    conn_id = rendered.get("ConfigMap", iris["configMapName"])["data"]["IRIS_S3_CONN_ID"]
    assert f"AIRFLOW_CONN_{conn_id.upper()}" in s3_secret["data"]
    assert "AIRFLOW_CONN" not in json.dumps(rendered.get("ConfigMap", iris["configMapName"]))


def test_remote_logging_goes_to_the_object_store(values, rendered):
    iris, logging_cfg = values["iris"], values["airflow"]["config"]["logging"]
    assert logging_cfg["remote_logging"] == "True"
    folder = logging_cfg["remote_base_log_folder"]
    bucket_prefix = f"s3://{iris['s3']['bucket']}/"
    assert folder.startswith(bucket_prefix), folder
    # Never under the landing prefix, where every new object is taken for a raw frame.
    assert not (folder[len(bucket_prefix):].rstrip("/") + "/").startswith(iris["s3"]["landingPrefix"])
    conn_id = logging_cfg["remote_log_conn_id"]
    s3_secret = rendered.get("Secret", iris["s3"]["secretName"])
    conn = json.loads(secret_value(s3_secret, f"AIRFLOW_CONN_{conn_id.upper()}"))
    assert conn["conn_type"] == "aws" and conn["extra"]["endpoint_url"] == iris["s3"]["endpointUrl"]
    # The api-server serves the logs: it has the connection too.
    api_env_from = yaml.safe_load(values["airflow"]["extraEnvFrom"])
    assert {"secretRef": {"name": iris["s3"]["secretName"]}} in api_env_from


def test_the_compute_sidecar_shares_socket_configuration_and_volumes(values):
    iris, workers = values["iris"], values["airflow"]["workers"]
    (sidecar,) = [c for c in workers["extraContainers"] if c["name"] == "iris-compute"]
    socket_path = iris["env"]["IRIS_COMPUTE_SOCKET"]
    argv = sidecar["command"]
    assert argv[:3] == ["python", "-m", "iris_tasks.orchestration.compute"]
    assert argv[argv.index("--socket") + 1] == socket_path
    # The tasks and the sidecar must see the same IRIS_* configuration, or every frame is
    # refused and computed in the task: the same secrets and config map as every container.
    assert sidecar["envFrom"] == yaml.safe_load(values["airflow"]["extraEnvFrom"])
    assert sidecar["image"] == f"{iris['image']['repository']}:{iris['image']['tag']}"
    socket_dir = str(Path(socket_path).parent)
    worker_mounts = {m["name"]: m["mountPath"] for m in workers["extraVolumeMounts"]}
    sidecar_mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    shared = [n for n, p in sidecar_mounts.items() if p == socket_dir]
    assert shared and worker_mounts[shared[0]] == socket_dir
    assert {"name": shared[0], "emptyDir": {}} in workers["extraVolumes"]
    # The same data volumes at the same paths as the worker.
    for name, path in worker_mounts.items():
        assert sidecar_mounts.get(name) == path, name


def test_task_pods_of_the_kubernetes_executor_get_no_sidecar(chart, values):
    merged = chart.merge_values(overlay())
    assert merged["airflow"]["workers"]["extraContainers"] == []
    assert merged["iris"]["env"]["IRIS_COMPUTE_SOCKET"] == "off"
    assert set(values["iris"]["env"]) <= set(merged["iris"]["env"])  # maps merge key by key
    assert "brokerUrlSecretName" not in merged["airflow"]["data"]  # null deletes, as in Helm
    env = render(chart, overlay()).get("ConfigMap", "iris-drs-env")["data"]
    assert env["IRIS_COMPUTE_SOCKET"] == "off"
