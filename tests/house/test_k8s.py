"""Every batch manifest under docker/k8s and docker/cloud, found recursively: yamllint,
Kubernetes schema validation for built-in kinds (kubernetes-validate, offline, strict), the
Kubeflow TrainJob against its CRD's OpenAPI schema (vendored, strict about unknown fields), and
what a schema cannot see: GPU limits, the secret mounted as a file, the exit-code rules equal
to lib/errors.py, the grace period, the image name, the recipe the args name, an Indexed Job's
index count against its shard_count."""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lib.errors import EXIT_DISK_FULL, EXIT_PREEMPTED, EXIT_UNAVAILABLE, EXIT_USER_ERROR
from lib.launch import GRACE_S

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
YAMLLINT_CONFIG = ROOT / "docker" / "yamllint.yaml"
MANIFEST_DIRS = [ROOT / "docker" / "k8s", ROOT / "docker" / "cloud"]
YAML_FILES = sorted(p for d in MANIFEST_DIRS for p in d.rglob("*.y*ml"))
JSON_FILES = sorted(p for d in MANIFEST_DIRS for p in d.rglob("*.json"))
# Kubernetes versions checked: the first with podFailurePolicy GA, and the newest known here.
K8S_VERSIONS = ["1.31", "1.37"]
# Kinds with no schema in kubernetes-validate (it only ships the built-in API). The TrainJob
# is validated against its CRD below (test_trainjob_matches_crd); a Kustomization is no API
# object at all (kubectl reads it), yamllint and test_kustomizations_* check it.
CRD_KINDS = {("trainer.kubeflow.org/v1alpha1", "TrainJob"), ("kustomize.config.k8s.io/v1beta1", "Kustomization")}
# Kubeflow Trainer v2.3.0 (commit 658725bd), copied unchanged: tests/fixtures/k8s/README.md.
KUBEFLOW_DIR = ROOT / "tests" / "fixtures" / "k8s"
KUBEFLOW_FILES = {
    "trainer.kubeflow.org_trainjobs.yaml": "a742cafc5b5582640c7e0b7467c024fc237256fbca5ba0a9f0531dfb66d64416",
    "torch_distributed.yaml": "c4520df54615d481831d402e644dbeaf77a7a521eae87b2e80fd5f789aac5df2",
}
CRD_FILES = {("trainer.kubeflow.org", "TrainJob"): KUBEFLOW_DIR / "trainer.kubeflow.org_trainjobs.yaml"}
MIN_GRACE_SECONDS = 120
JOBS = {"prepare", "train", "eval", "export", "transcribe", "bench"}
ENV_FILE_IN_POD = "/secrets/whisper.env"


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def docs() -> list[tuple[Path, dict]]:
    out = []
    for path in YAML_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


def of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in docs() if d.get("kind") == kind]


def image_name() -> str:
    m = re.search(r"^IMAGE_NAME \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m
    return m.group(1)


def test_manifests_exist():
    kinds = {d["kind"] for _, d in docs()}
    assert {"Job", "PersistentVolumeClaim", "TrainJob", "Kustomization"} <= kinds
    assert any(p.name == "aws-batch-job-definition.json" for p in JSON_FILES)


# ---- yamllint, schemas -------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yamllint(path):
    proc = subprocess.run([str(BIN / "yamllint"), "-c", str(YAMLLINT_CONFIG), "--strict", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_yamllint_catches_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\nb:   [1,2]\n")
    proc = subprocess.run([str(BIN / "yamllint"), "-c", str(YAMLLINT_CONFIG), "--strict", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "duplication" in proc.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_schema(path, version):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    for doc in yaml.safe_load_all(path.read_text()):
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_KINDS:
            # Not silently skipped: this asserts that the schema really is absent, so a
            # kubernetes-validate that learns the kind makes this test fail and get updated.
            # (The TrainJob's own check is test_trainjob_matches_crd.)
            with pytest.raises(SchemaNotFoundError):
                kubernetes_validate.validate(doc, version, strict=True)
            continue
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_rejects_a_broken_job():
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    (_, job), *_ = of_kind("Job")
    bad = copy.deepcopy(job)
    bad["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = copy.deepcopy(job)
    bad["spec"]["backoffLimit"] = "six"
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


# ---- the one-GPU Job ---------------------------------------------------------------------


def trainjob_pod_patches(tj: dict) -> list[tuple[str, dict]]:
    """(replicated job name, pod spec patch) for each job a TrainJob's runtimePatches patch."""
    out = []
    for patch in tj["spec"].get("runtimePatches", []):
        for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            out.append((rj["name"], rj["template"]["spec"]["template"]["spec"]))
    return out


def pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod the manifests make."""
    out = [(f"{rel(p)}:{d['metadata']['name']}", d["spec"]["template"]["spec"]) for p, d in of_kind("Job")]
    for p, d in of_kind("TrainJob"):
        for job, spec in trainjob_pod_patches(d):
            out.append((f"{rel(p)}:{d['metadata']['name']}:{job}", spec))
    return out


def containers() -> list[tuple[str, dict]]:
    out = []
    for p, d in of_kind("Job"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            out.append((f"{rel(p)}:{c['name']}", c))
    for p, d in of_kind("TrainJob"):
        out.append((f"{rel(p)}:trainer", d["spec"]["trainer"]))
    return out


def pod_failure_action(rules: list[dict], containers: set[str], exit_code: int,
                       conditions: tuple[str, ...] = ()) -> str:
    """Kubernetes podFailurePolicy: the first matching rule wins; no match counts against
    backoffLimit."""
    for rule in rules:
        on = rule.get("onExitCodes")
        if on:
            assert on.get("containerName", next(iter(containers))) in containers
            hit = exit_code in on["values"]
            if (on["operator"] == "In") == hit:
                return rule["action"]
        for cond in rule.get("onPodConditions", []):
            if cond["type"] in conditions:
                return rule["action"]
    return "Count"


def test_job_failure_policy_matches_lib_errors():
    for path, job in of_kind("Job"):
        spec = job["spec"]
        assert spec["template"]["spec"]["restartPolicy"] == "Never", path
        assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0, path
        rules = spec["podFailurePolicy"]["rules"]
        names = {c["name"] for c in spec["template"]["spec"]["containers"]}
        assert pod_failure_action(rules, names, EXIT_USER_ERROR) == "FailJob", path
        assert pod_failure_action(rules, names, EXIT_DISK_FULL) == "FailJob", path
        assert pod_failure_action(rules, names, EXIT_PREEMPTED) == "Count", path
        assert pod_failure_action(rules, names, EXIT_UNAVAILABLE) == "Count", path  # a bucket that did not answer
        assert pod_failure_action(rules, names, 1) == "Count", path
        assert pod_failure_action(rules, names, 137) == "Count", path
        assert pod_failure_action(rules, names, 137, ("DisruptionTarget",)) == "Ignore", path
        assert pod_failure_action(rules, names, EXIT_PREEMPTED, ("DisruptionTarget",)) == "Ignore", path


def test_pod_failure_checker_is_order_sensitive():
    rules = [{"action": "Count", "onExitCodes": {"operator": "NotIn", "values": [0]}},
             {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}]
    assert pod_failure_action(rules, {"job"}, 2) == "Count"


@pytest.mark.parametrize("where_spec", pod_specs(), ids=lambda w: w[0])
def test_pod_volumes_secret_file_shm_data(where_spec):
    where, spec = where_spec
    vols = {v["name"]: v for v in spec["volumes"]}
    secrets = [v for v in vols.values() if "secret" in v]
    assert secrets, f"{where}: the token Secret must be a mounted file"
    assert any("persistentVolumeClaim" in v for v in vols.values()), where
    shm = [v for v in vols.values() if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert shm, f"{where}: no emptyDir medium Memory for /dev/shm"
    for c in spec["containers"]:
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        assert mounts["/dev/shm"]["name"] == shm[0]["name"], where
        assert "persistentVolumeClaim" in vols[mounts["/data"]["name"]], where
        secret_mount = mounts[str(Path(ENV_FILE_IN_POD).parent)]
        assert secret_mount.get("readOnly") is True and "secret" in vols[secret_mount["name"]], where


def test_job_grace_period_leaves_time_to_checkpoint():
    for path, job in of_kind("Job"):
        assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= MIN_GRACE_SECONDS, path


def _walk(obj):
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def test_no_secret_as_environment_variable_and_no_literal_token():
    for path in YAML_FILES:
        text = path.read_text()
        assert not re.search(r"\bhf_[A-Za-z0-9]{20,}", text), path
        for node in _walk(yaml.safe_load(text)):
            assert "secretKeyRef" not in node and "secretRef" not in node, f"{path}: secret in env"
    for p, _ in of_kind("Secret"):
        pytest.fail(f"{p}: a Secret with data is committed; create it from .env with kubectl")


@pytest.mark.parametrize("where_c", containers(), ids=lambda w: w[0])
def test_container_gpu_image_and_args(where_c):
    where, c = where_c
    res = c.get("resources") or c.get("resourcesPerNode")
    limits, requests = res["limits"], res.get("requests", {})
    if c["args"][0] == "prepare":  # decoding and tokenizing: CPU work, no GPU to hold idle
        assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in requests, where
    else:
        gpus = int(limits["nvidia.com/gpu"])
        assert gpus >= 1, where
        # extended resources: a request, if given, must equal the limit
        assert int(requests.get("nvidia.com/gpu", gpus)) == gpus, where
    assert "memory" in limits, where
    # the image is the Makefile's; kustomization.yaml sets registry and tag
    assert c["image"].split(":")[0] == image_name(), where
    # tini stays PID 1: either no command (the image ENTRYPOINT) or one that starts with tini
    if "command" in c:
        assert c["command"][:2] == ["tini", "--"], where
    args = c["args"]
    # torchrun only through lib/launch.py (exit 3 after a checkpoint, exit 2 kept)
    launcher = args[:3] == ["python", "-m", "lib.launch"]
    assert args[0] in JOBS or launcher, where
    assert args[args.index("--env-file") + 1] == ENV_FILE_IN_POD, where
    recipe = args[args.index("--recipe") + 1]
    assert (ROOT / recipe).is_file(), f"{where}: {recipe} does not exist"
    if launcher:
        assert args[args.index("-m", 3) + 1] == "jobs.train", where


def test_trainjob_is_multi_node_torchrun():
    (path, tj), *_ = of_kind("TrainJob")
    spec = tj["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    assert spec["trainer"]["numNodes"] >= 2
    assert int(spec["trainer"]["numProcPerNode"]) == int(spec["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"])
    # the patch must target the node job and name its container
    ((job, pod),) = trainjob_pod_patches(tj)
    assert job == "node"
    assert [c["name"] for c in pod["containers"]] == ["node"]
    # torchrun (lib.launch) waits GRACE_S for the workers' checkpoint: the pod must outlast it
    assert spec["trainer"]["args"][:3] == ["python", "-m", "lib.launch"]
    assert pod["terminationGracePeriodSeconds"] > GRACE_S
    # every node reads the same prepared data and writes the same run: the claim must be RWX
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    (pvc,) = [d for _, d in of_kind("PersistentVolumeClaim") if d["metadata"]["name"] == claim]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_indexed_prepare_job_runs_one_index_per_shard():
    """completions = parallelism = the shard_count its args pass; no shard_index in the args
    (each pod's comes from JOB_COMPLETION_INDEX); pod i gets shard i; the args parse as a
    prepare config; its workers fit the CPUs it asks for; every index writes the same RWX claim."""
    from jobs.prepare import PrepareConfig
    from lib.config import load_config
    from lib.env import Env

    indexed = [(p, d) for p, d in of_kind("Job") if d["spec"].get("completionMode") == "Indexed"]
    assert indexed, "no Indexed Job (sharded prepare) under docker/k8s"
    for path, job in indexed:
        spec = job["spec"]
        pod = spec["template"]["spec"]
        (c,) = pod["containers"]
        args = c["args"]
        assert args[0] == "prepare", path
        flags = [a for a in args[1:] if "=" in a and not a.startswith("-")]
        values = dict(a.split("=", 1) for a in flags)
        count = int(values["shard_count"])
        assert spec["completions"] == count and spec["parallelism"] == count, path
        assert "shard_index" not in values, f"{path}: shard_index comes from JOB_COMPLETION_INDEX"
        cfg = load_config(PrepareConfig, ROOT / args[args.index("--recipe") + 1], flags)
        assert [cfg.index(Env(data_dir=Path("/data"), job_completion_index=i)) for i in range(count)] == list(
            range(count))
        assert cfg.num_proc <= int(c["resources"]["requests"]["cpu"]), path
        claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)["persistentVolumeClaim"]["claimName"]
        (pvc,) = [d for _, d in of_kind("PersistentVolumeClaim") if d["metadata"]["name"] == claim]
        assert "ReadWriteMany" in pvc["spec"]["accessModes"], path


def test_bucket_prepare_writes_the_bucket_only():
    """The Indexed Job that prepares into a bucket (out=s3://...): the shared volume only read (the
    source), the pod's scratch an emptyDir that DATA_DIR points at, the keys in the Secret's file."""
    from lib.dataset.bucket import is_bucket

    found = []
    for path, job in of_kind("Job"):
        pod = job["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        out = [a.split("=", 1)[1] for a in c["args"] if a.startswith("out=")]
        if not out or not is_bucket(out[0]):
            continue
        found.append(path)
        assert job["spec"].get("completionMode") == "Indexed", path
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        assert mounts["/data"].get("readOnly") is True, path
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        scratch = next(m for p, m in mounts.items() if env["DATA_DIR"] == p)
        assert "emptyDir" in vols[scratch["name"]] and env["HF_HOME"].startswith(env["DATA_DIR"]), path
        assert not any(name.startswith(("AWS_", "GOOGLE_")) for name in env), f"{path}: keys come from the Secret"
    assert found, "no Indexed Job under docker/k8s prepares into a bucket"


def test_kustomizations_name_the_image_and_existing_resources():
    for path, k in of_kind("Kustomization"):
        assert [i["name"] for i in k["images"]] == [image_name()], path
        for r in k["resources"]:
            assert (path.parent / r).is_file(), f"{path}: {r}"
    # the kustomizations agree on where the image lives
    images = {json.dumps(k["images"]) for _, k in of_kind("Kustomization")}
    assert len(images) == 1
    # every Job / PVC under docker/k8s is in a kustomization
    listed = {(p.parent / r).resolve() for p, k in of_kind("Kustomization") for r in k["resources"]}
    for path, d in docs():
        if d["kind"] != "Kustomization":
            assert path.resolve() in listed, path


# ---- Kubeflow TrainJob against its CRD -----------------------------------------------------


def openapi_to_jsonschema(s: dict) -> dict:
    """A CRD's structural OpenAPI v3 schema as JSON Schema (draft 4), with the API server's rules:
    an object with `properties` takes no other field unless x-kubernetes-preserve-unknown-fields
    (the server prunes or, with kubectl's strict field validation, rejects it: a misspelled
    field would otherwise pass); x-kubernetes-int-or-string is an integer or a string;
    nullable adds null. x-kubernetes-list-type map/set are kept and checked by crd_validator.
    CEL rules (x-kubernetes-validations) are not evaluated: the API server does that."""
    out = {}
    for k, v in s.items():
        if k == "properties":
            out[k] = {name: openapi_to_jsonschema(p) for name, p in v.items()}
        elif k in ("items", "additionalProperties", "not") and isinstance(v, dict):
            out[k] = openapi_to_jsonschema(v)
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [openapi_to_jsonschema(x) for x in v]
        elif k in ("x-kubernetes-list-type", "x-kubernetes-list-map-keys"):
            out[k] = v
        elif k.startswith("x-") or k in ("nullable", "default", "description"):
            continue
        else:
            out[k] = v
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _list_type(validator, value, instance, schema):
    """x-kubernetes-list-type: set -> unique items; map -> unique x-kubernetes-list-map-keys, present."""
    from jsonschema import ValidationError

    if not isinstance(instance, list):
        return
    if value == "set" and len({json.dumps(x, sort_keys=True) for x in instance}) != len(instance):
        yield ValidationError(f"list-type set with duplicates: {instance}")
    if value == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            missing = [k for k in keys if k not in item]
            if missing:
                yield ValidationError(f"list-type map item without its key {missing}: {item}")
            key = tuple(json.dumps(item.get(k)) for k in keys)
            if key in seen:
                yield ValidationError(f"list-type map: two items with {dict(zip(keys, key, strict=True))}")
            seen.add(key)


def crd_validator(api_version: str, kind: str):
    """A jsonschema validator for the served CRD version `api_version` names."""
    from jsonschema import Draft4Validator, validators

    group, version = api_version.split("/")
    crd = yaml.safe_load(CRD_FILES[(group, kind)].read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == group
    assert crd["spec"]["names"]["kind"] == kind
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert v["served"], f"{api_version} {kind} is not served by this CRD"
    schema = openapi_to_jsonschema(v["schema"]["openAPIV3Schema"])
    cls = validators.extend(Draft4Validator, {"x-kubernetes-list-type": _list_type})
    cls.check_schema(schema)
    return cls(schema)


def crd_errors(doc: dict) -> list[str]:
    errors = crd_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors)


def trainjobs() -> list[tuple[Path, dict]]:
    found = of_kind("TrainJob")
    assert found, "no TrainJob under docker/k8s"
    return found


def test_kubeflow_fixtures_are_the_vendored_release():
    for name, sha in KUBEFLOW_FILES.items():
        assert hashlib.sha256((KUBEFLOW_DIR / name).read_bytes()).hexdigest() == sha, (
            f"{name} differs from Kubeflow Trainer v2.3.0: take it unchanged from a release (tests/fixtures/k8s/README.md)")
        assert sha in (KUBEFLOW_DIR / "README.md").read_text(), name


@pytest.mark.parametrize("path_doc", trainjobs(), ids=lambda pd: f"{rel(pd[0])}:{pd[1]['metadata']['name']}")
def test_trainjob_matches_crd(path_doc):
    path, tj = path_doc
    assert crd_errors(tj) == [], path
    # the multi-node kustomization applies it
    (k,) = [k for p, k in of_kind("Kustomization") if p.parent == path.parent]
    assert path.name in k["resources"]


def test_crd_schema_rejects_a_broken_trainjob():
    (_, tj), *_ = trainjobs()
    assert crd_errors(tj) == []

    def broken(edit) -> list[str]:
        bad = copy.deepcopy(tj)
        edit(bad)
        return crd_errors(bad)

    def misspell(d):
        d["spec"]["trainer"]["numNode"] = d["spec"]["trainer"].pop("numNodes")

    assert any("'numNode' was unexpected" in e for e in broken(misspell))
    assert any(e.startswith("spec.trainer.numNodes:") for e in broken(
        lambda d: d["spec"]["trainer"].update(numNodes="two")))
    # the API before Trainer v2.2 (what this manifest used): unknown since runtimePatches replaced it
    assert any("'podTemplateOverrides' was unexpected" in e for e in broken(
        lambda d: d["spec"].update(podTemplateOverrides=[{"targetJobs": [{"name": "node"}]}])))

    def pod(d):
        return trainjob_pod_patches(d)[0][1]

    # deep in the pod patch: a misspelled key, a field the patch does not allow, a duplicate volume
    assert any("'mountPth' was unexpected" in e for e in broken(
        lambda d: pod(d)["containers"][0]["volumeMounts"].append({"name": "x", "mountPth": "/x"})))
    assert any("'resources' was unexpected" in e for e in broken(
        lambda d: pod(d)["containers"][0].update(resources={})))
    assert any("two items" in e for e in broken(lambda d: pod(d)["volumes"].append(dict(pod(d)["volumes"][0]))))
    # int-or-string quantities: 8 and "8" are both GPUs, a list is not
    assert broken(lambda d: d["spec"]["trainer"]["resourcesPerNode"]["limits"].update({"nvidia.com/gpu": "8"})) == []
    assert broken(lambda d: d["spec"]["trainer"]["resourcesPerNode"]["limits"].update({"nvidia.com/gpu": [8]}))
    assert any("'name' is a required property" in e for e in broken(lambda d: d["spec"]["runtimeRef"].pop("name")))


def test_openapi_conversion():
    s = openapi_to_jsonschema({
        "type": "object",
        "properties": {
            "q": {"x-kubernetes-int-or-string": True},
            "n": {"type": "string", "nullable": True},
            "free": {"type": "object", "properties": {"a": {"type": "string"}},
                     "x-kubernetes-preserve-unknown-fields": True},
        },
    })
    assert s["additionalProperties"] is False and "additionalProperties" not in s["properties"]["free"]
    assert s["properties"]["q"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert s["properties"]["n"]["type"] == ["string", "null"]


def test_trainjob_patches_what_the_runtime_has():
    """Trainer refuses a patch of a job or container its runtime lacks (the migration guide's
    example names a container `trainer`; the torch-distributed runtime's is `node`)."""
    runtime = yaml.safe_load((KUBEFLOW_DIR / "torch_distributed.yaml").read_text())
    assert runtime["kind"] == "ClusterTrainingRuntime"
    jobs = {rj["name"]: rj for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    for path, tj in trainjobs():
        assert tj["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"], path
        assert tj["spec"]["runtimeRef"].get("kind", "ClusterTrainingRuntime") == runtime["kind"], path
        assert "torch" in runtime["spec"]["mlPolicy"], path  # the plugin that sets PET_* for torchrun
        for job, pod in trainjob_pod_patches(tj):
            rj = jobs[job]
            # Trainer's trainer fields (image, command, resourcesPerNode) land in this job
            assert rj["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
            names = {c["name"] for c in rj["template"]["spec"]["template"]["spec"]["containers"]}
            assert {c["name"] for c in pod["containers"]} <= names, path


# ---- AWS Batch -----------------------------------------------------------------------------


def aws_action(rules: list[dict], exit_code: int | None, status_reason: str = "", reason: str = "") -> str:
    """AWS Batch evaluateOnExit: the first rule whose every given condition matches wins
    (patterns may end in *); no match -> RETRY while attempts remain."""

    def match(pattern: str | None, value: str | None) -> bool:
        if pattern is None:
            return True
        return value is not None and fnmatch.fnmatchcase(value, pattern)

    for r in rules:
        if (match(r.get("onExitCode"), None if exit_code is None else str(exit_code))
                and match(r.get("onStatusReason"), status_reason) and match(r.get("onReason"), reason)):
            return r["action"].upper()
    return "RETRY"


@pytest.mark.parametrize("path", JSON_FILES, ids=rel)
def test_aws_batch_retry_rules_match_lib_errors(path):
    jd = json.loads(path.read_text())
    strategy = jd["retryStrategy"]
    rules = strategy["evaluateOnExit"]
    assert 2 <= strategy["attempts"] <= 10 and len(rules) <= 5
    for r in rules:
        assert r["action"] in ("EXIT", "RETRY")
        assert all(re.fullmatch(r"[0-9]*\*?", r[k]) for k in ("onExitCode",) if k in r)
    assert aws_action(rules, EXIT_USER_ERROR) == "EXIT"
    assert aws_action(rules, EXIT_DISK_FULL) == "EXIT"
    assert aws_action(rules, EXIT_PREEMPTED) == "RETRY"
    assert aws_action(rules, 1) == "RETRY" and aws_action(rules, 137) == "RETRY"
    assert aws_action(rules, None, status_reason="Host EC2 (instance i-0abc) terminated.") == "RETRY"
    cp = jd["containerProperties"]
    assert cp["command"][0] in JOBS
    assert cp["image"].rsplit("/", 1)[-1].split(":")[0] == image_name()
    assert {"type": "GPU", "value": "1"} in cp["resourceRequirements"]
    assert cp["user"].split(":")[0] == "1000"
    # the token comes from Secrets Manager at run time, never as a literal value
    assert [s["name"] for s in cp["secrets"]] == ["HF_TOKEN"]
    assert all(s["valueFrom"].startswith("arn:aws:secretsmanager:") for s in cp["secrets"])
    assert not any("TOKEN" in e["name"] or "KEY" in e["name"] for e in cp.get("environment", []))
    recipe = jd["parameters"]["recipe"]
    assert (ROOT / recipe).is_file(), recipe
    assert cp["linuxParameters"]["sharedMemorySize"] >= 1024


def test_aws_rule_order_matters():
    # the checker is not vacuous: the catch-all first would retry config errors
    assert aws_action([{"onExitCode": "*", "action": "RETRY"}, {"onExitCode": "2", "action": "EXIT"}], 2) == "RETRY"
