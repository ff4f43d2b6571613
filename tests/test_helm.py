"""The Helm chart helm/iris-drs without helm: schema-validate the values, render the templates
with a small Go-template evaluator (the subset the chart uses) and check the Kubernetes objects.

``helm`` cannot be installed from PyPI or Debian here, so the evaluator below stands in for
``helm template``; it fails loudly on any construct it does not know, which keeps the chart
within what is tested. When a ``helm`` binary is on PATH, ``helm lint`` runs as well.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "iris-drs"


# --------------------------------------------------------------------------- mini Go templates
class TemplateError(Exception):
    pass


_ACTION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(\(|\))|(\|)|(:=)|(,)|([^\s()|,]+))')


def _lex(template: str) -> list[tuple[str, str]]:
    """Split into ("text", s) and ("action", s) items, applying {{- and -}} trimming."""
    items: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        items.append(("text", text))
        body = m.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            items.append(("action", body))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = template[pos:]
    items.append(("text", tail.lstrip() if trim_next else tail))
    return items


def _parse(items: list[tuple[str, str]], i: int = 0, stop: tuple[str, ...] = ()) -> tuple[list, int, str]:
    """Build a tree of text/expr/if/range/define nodes; returns (nodes, next index, stopper)."""
    nodes: list = []
    while i < len(items):
        kind, s = items[i]
        i += 1
        if kind == "text":
            nodes.append(("text", s))
            continue
        word = s.split(None, 1)[0]
        rest = s[len(word) :].strip()
        if word in stop:
            return nodes, i, s
        if word == "if":
            body, i, end = _parse(items, i, ("else", "end"))
            orelse: list = []
            if end.startswith("else"):
                orelse, i, _ = _parse(items, i, ("end",))
            nodes.append(("if", rest, body, orelse))
        elif word == "range":
            body, i, _ = _parse(items, i, ("end",))
            nodes.append(("range", rest, body))
        elif word == "define":
            body, i, _ = _parse(items, i, ("end",))
            nodes.append(("define", json.loads(rest), body))
        elif word in ("with", "template", "block", "else", "end"):
            raise TemplateError(f"unsupported action {{{{ {s} }}}}")
        else:
            nodes.append(("expr", s))
    return nodes, i, ""


def _truthy(v: Any) -> bool:
    return not (v is None or v is False or v == 0 or v == "" or v == [] or v == {})


def _to_yaml(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True).rstrip("\n")


class Renderer:
    def __init__(self, ctx: dict):
        self.ctx = ctx
        self.defines: dict[str, list] = {}

    # ---- expressions
    def _tokens(self, expr: str) -> list[str]:
        out, pos = [], 0
        while pos < len(expr):
            m = _TOKEN.match(expr, pos)
            if not m or m.end() == pos:
                if expr[pos:].strip() == "":
                    break
                raise TemplateError(f"cannot tokenize {expr!r}")
            out.append(next(g for g in m.groups() if g is not None))
            pos = m.end()
        return out

    def eval(self, expr: str, dot: Any, scope: dict) -> Any:
        toks = self._tokens(expr)
        if len(toks) >= 2 and toks[1] == ":=":
            value = self._pipeline(toks[2:], dot, scope)
            scope[toks[0]] = value
            return ""
        return self._pipeline(toks, dot, scope)

    def _pipeline(self, toks: list[str], dot: Any, scope: dict) -> Any:
        cmds, depth, cur = [], 0, []
        for t in toks:
            depth += (t == "(") - (t == ")")
            if t == "|" and depth == 0:
                cmds.append(cur)
                cur = []
            else:
                cur.append(t)
        cmds.append(cur)
        value: Any = _NO_VALUE
        for cmd in cmds:
            value = self._command(cmd, dot, scope, value)
        return value

    def _operands(self, toks: list[str], dot: Any, scope: dict) -> list[Any]:
        vals, i = [], 0
        while i < len(toks):
            t = toks[i]
            if t == "(":
                depth, j = 1, i + 1
                while depth:
                    depth += (toks[j] == "(") - (toks[j] == ")")
                    j += 1
                vals.append(self._pipeline(toks[i + 1 : j - 1], dot, scope))
                i = j
                continue
            vals.append(self._atom(t, dot, scope))
            i += 1
        return vals

    def _atom(self, t: str, dot: Any, scope: dict) -> Any:
        if t.startswith('"'):
            return json.loads(t)
        if re.fullmatch(r"-?\d+", t):
            return int(t)
        if t in ("true", "false"):
            return t == "true"
        if t.startswith("."):
            return self._field(dot, t)
        if t.startswith("$"):
            name, _, path = t.partition(".")
            base = self.ctx if name == "$" else scope[name]
            return self._field(base, "." + path) if path else base
        return _Func(t)

    @staticmethod
    def _field(base: Any, path: str) -> Any:
        value = base
        for part in [p for p in path.split(".") if p]:
            value = value.get(part) if isinstance(value, dict) else None
        return value

    def _command(self, toks: list[str], dot: Any, scope: dict, piped: Any) -> Any:
        vals = self._operands(toks, dot, scope)
        if piped is not _NO_VALUE:
            vals.append(piped)
        head, args = vals[0], vals[1:]
        if not isinstance(head, _Func):
            if args:
                raise TemplateError(f"value cannot take arguments: {toks}")
            return head
        return self._call(head.name, args)

    def _call(self, name: str, a: list[Any]) -> Any:
        if name == "include":
            return self.render_nodes(self.defines[a[0]], a[1], {})
        simple = {
            "quote": lambda v: json.dumps("" if v is None else str(v)),
            "b64enc": lambda v: base64.b64encode(str(v).encode()).decode(),
            "toJson": lambda v: json.dumps(v, separators=(",", ":"), sort_keys=True),
            "toYaml": _to_yaml,
            "not": lambda v: not _truthy(v),
        }
        if name in simple:
            return simple[name](*a)
        if name in ("nindent", "indent"):
            pad = " " * a[0]
            text = "\n".join(pad + line for line in str(a[1]).split("\n"))
            return "\n" + text if name == "nindent" else text
        if name == "printf":
            return a[0].replace("%s", "{}").format(*a[1:])
        if name == "dict":
            return {a[i]: a[i + 1] for i in range(0, len(a), 2)}
        if name == "default":
            return a[1] if _truthy(a[1]) else a[0]
        if name == "eq":
            return a[0] == a[1]
        raise TemplateError(f"unsupported function {name!r}")

    # ---- statements
    def render_nodes(self, nodes: list, dot: Any, scope: dict) -> str:
        out: list[str] = []
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "expr":
                v = self.eval(node[1], dot, scope)
                out.append("" if v is None else str(v))
            elif kind == "if":
                branch = node[2] if _truthy(self.eval(node[1], dot, scope)) else node[3]
                out.append(self.render_nodes(branch, dot, scope))
            elif kind == "range":
                m = re.fullmatch(r"(\$\w+)\s*,\s*(\$\w+)\s*:=\s*(.+)", node[1])
                if not m:
                    raise TemplateError(f"only `range $k, $v := ...` is supported: {node[1]}")
                seq = self.eval(m.group(3), dot, scope) or {}
                pairs = sorted(seq.items()) if isinstance(seq, dict) else list(enumerate(seq))
                for k, v in pairs:
                    out.append(self.render_nodes(node[2], dot, {**scope, m.group(1): k, m.group(2): v}))
            elif kind == "define":
                self.defines[node[1]] = node[2]
        return "".join(out)

    def render(self, text: str) -> str:
        nodes, _, _ = _parse(_lex(text))
        return self.render_nodes(nodes, self.ctx, {})


class _Func:
    def __init__(self, name: str):
        self.name = name


_NO_VALUE = object()


def render_chart(values: dict) -> dict[str, list[dict]]:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    ctx = {
        "Values": values,
        "Release": {"Name": "iris", "Namespace": "iris", "Service": "Helm"},
        "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]},
    }
    r = Renderer(ctx)
    for helper in sorted((CHART / "templates").glob("_*.tpl")):
        r.render(helper.read_text())
    out: dict[str, list[dict]] = {}
    for tpl in sorted((CHART / "templates").glob("*.yaml")):
        text = r.render(tpl.read_text())
        out[tpl.name] = [d for d in yaml.safe_load_all(text) if d]
    r.render((CHART / "templates" / "NOTES.txt").read_text())  # must at least evaluate
    return out


def _merge(base: dict, over: dict) -> dict:
    res = copy.deepcopy(base)
    for k, v in over.items():
        res[k] = _merge(res[k], v) if isinstance(v, dict) and isinstance(res.get(k), dict) else v
    return res


# --------------------------------------------------------------------------- fixtures / tests
@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def test_mini_renderer_semantics():
    r = Renderer({"Values": {"a": {"b": "x\"y"}, "m": {"K2": "2", "K1": 1}}})
    assert r.render('v: {{ .Values.a.b | quote }}') == 'v: "x\\"y"'
    assert r.render("{{- if not .Values.nope }}yes{{ else }}no{{ end }}") == "yes"
    text = "{{- range $k, $v := .Values.m }}\n{{ $k }}={{ $v | quote }}\n{{- end }}"
    assert r.render(text) == "\nK1=\"1\"\nK2=\"2\""
    with pytest.raises(TemplateError):
        r.render("{{ .Values.a | upper }}")


def test_values_match_schema(values, schema):
    jsonschema.validate(values, schema)
    overlay = yaml.safe_load((CHART / "values-kubernetes-executor.yaml").read_text())
    jsonschema.validate(_merge(values, overlay), schema)


@pytest.mark.parametrize(
    "patch",
    [
        {"airflow": {"executor": "SequentialExecutor"}},
        {"iris": {"s3": {"endpointUrl": "seaweed:8333"}}},
        {"iris": {"database": {"url": "mysql://x"}}},
        {"iris": {"ledger": {"url": "sqlite:////opt/iris/state/ledger.sqlite"}}},
        {"iris": {"ledger": {"schema": "Iris-Ledger"}}},
        {"iris": {"env": {"lower_case": "x"}}},
        {"iris": {"unknown": 1}},
    ],
)
def test_schema_rejects_bad_values(values, schema, patch):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_merge(values, patch), schema)


def test_chart_renders_to_valid_objects(values):
    rendered = render_chart(values)
    docs = [d for ds in rendered.values() for d in ds]
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [
        ("ConfigMap", "iris-drs-env"),
        ("PersistentVolumeClaim", "iris-drs-crds-cache"),
        ("PersistentVolumeClaim", "iris-drs-state"),
        ("Secret", "iris-drs-airflow-broker"),
        ("Secret", "iris-drs-airflow-metadata"),
        ("Secret", "iris-drs-ledger"),
        ("Secret", "iris-drs-s3-connection"),
    ]
    for d in docs:
        assert d["apiVersion"] == "v1"
        assert d["metadata"]["labels"]["app.kubernetes.io/instance"] == "iris"
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    conn = json.loads(base64.b64decode(secrets["iris-drs-s3-connection"]["data"]["AIRFLOW_CONN_IRIS_S3"]))
    assert conn["conn_type"] == "aws"
    assert conn["extra"]["endpoint_url"] == values["iris"]["s3"]["endpointUrl"]
    meta = base64.b64decode(secrets["iris-drs-airflow-metadata"]["data"]["connection"]).decode()
    assert meta == values["iris"]["database"]["url"]
    env = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert json.loads(env["AIRFLOW__OPENLINEAGE__TRANSPORT"])["type"] == "http"
    assert env["CRDS_PATH"] == values["iris"]["crdsCache"]["mountPath"]
    # The variables iris_tasks.config reads.
    assert env["IRIS_STATE_DIR"] == values["iris"]["state"]["mountPath"]
    assert env["IRIS_LANDING"] == "s3://iris-drs/landing/"
    assert env["IRIS_STORE_URL"] == "s3://iris-drs?conn_id=iris_s3"
    assert env["IRIS_OBSERVATORY"] == "tmt"
    # The frame ledger: PostgreSQL, by default the metadata database, in its own schema.
    ledger_url = base64.b64decode(secrets["iris-drs-ledger"]["data"]["IRIS_LEDGER_URL"]).decode()
    assert ledger_url == values["iris"]["database"]["url"]
    assert env["IRIS_LEDGER_SCHEMA"] == values["iris"]["ledger"]["schema"] == "iris_ledger"
    assert "IRIS_LEDGER_URL" not in env  # carries a password: secret only
    assert all(isinstance(v, str) for v in env.values())  # ConfigMap data must be strings
    for pvc in (d for d in docs if d["kind"] == "PersistentVolumeClaim"):
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_ledger_url_renders_from_its_own_value(values):
    url = "postgresql+psycopg2://iris:pw@ledger-db.iris.svc:5432/iris_ledger"
    rendered = render_chart(_merge(values, {"iris": {"ledger": {"url": url, "schema": ""}}}))
    secret = next(d for d in rendered["secrets.yaml"] if d["metadata"]["name"] == "iris-drs-ledger")
    assert base64.b64decode(secret["data"]["IRIS_LEDGER_URL"]).decode() == url
    env = rendered["configmap-env.yaml"][0]["data"]
    assert "IRIS_LEDGER_SCHEMA" not in env  # no schema: the URL's search_path (public)
    # What the pods' settings make of that environment: the database, driver suffix dropped.
    from iris_tasks.config import _ledger_url
    from iris_tasks.orchestration.ledger import parse_location

    loc = parse_location(_ledger_url(url, env.get("IRIS_LEDGER_SCHEMA")))
    assert loc.is_postgres and loc.schema is None
    assert loc.dsn == "postgresql://iris:pw@ledger-db.iris.svc:5432/iris_ledger"


def test_kubernetes_executor_overlay_drops_broker(values):
    overlay = yaml.safe_load((CHART / "values-kubernetes-executor.yaml").read_text())
    rendered = render_chart(_merge(values, overlay))
    names = {d["metadata"]["name"] for ds in rendered.values() for d in ds}
    assert "iris-drs-airflow-broker" not in names
    assert "iris-drs-s3-connection" in names


def test_existing_secrets_are_not_overwritten(values):
    patch = {"iris": {k: {"create": False} for k in ("database", "ledger", "broker", "s3")}}
    rendered = render_chart(_merge(values, patch))
    assert rendered["secrets.yaml"] == []


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


def test_versions_agree_with_project_and_dockerfile(values):
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'apache-airflow\[[^\]]*\]==([0-9.]+)', pyproject).group(1)
    assert values["airflow"]["airflowVersion"] == pinned
    dockerfile = (CHART / "Dockerfile").read_text()
    assert f"ARG AIRFLOW_VERSION={pinned}" in dockerfile
    assert "COPY --chown=airflow:root dags/ /opt/airflow/dags/" in dockerfile
    assert "COPY --chown=airflow:root plugins/ /opt/airflow/plugins/" in dockerfile
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["dependencies"][0]["name"] == "airflow"
    assert chart["dependencies"][0]["condition"] == "airflow.enabled"


@pytest.mark.skipif(shutil.which("helm") is None, reason="helm binary not installed (not on PyPI/Debian)")
def test_helm_lint():
    # `helm lint` needs the dependency: only run where `helm dependency build` can fetch it.
    proc = subprocess.run(["helm", "lint", str(CHART)], capture_output=True, text=True, timeout=120)
    if "missing in charts/ directory" in proc.stdout + proc.stderr:
        pytest.skip("airflow chart dependency not fetched (helm dependency build needs network)")
    assert proc.returncode == 0, proc.stdout + proc.stderr


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


def test_task_pods_of_the_kubernetes_executor_get_no_sidecar(values):
    overlay = yaml.safe_load((CHART / "values-kubernetes-executor.yaml").read_text())
    merged = _merge(values, overlay)
    assert merged["airflow"]["workers"]["extraContainers"] == []
    assert merged["iris"]["env"]["IRIS_COMPUTE_SOCKET"] == "off"
    assert set(values["iris"]["env"]) <= set(merged["iris"]["env"])  # maps merge key by key
