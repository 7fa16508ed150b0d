"""Security properties that need no server: no unpickling of anything a user or a file could supply,
constant-time key comparison, names and ids that cannot leave their folders, and an upload parser
that answers 422 (never crashes) on arbitrary bytes."""

from __future__ import annotations

import ast
import inspect
import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loracore.artifact import name_problem as adapter_name_problem
from loracore.lora_format import BaseLayout
from service import auth
from service.adapters import store
from service.engine.engine import valid_ref as worker_valid_name  # the worker checks name or name@version
from service.errors import ApiError
from service.jobs import validate
from service.jobs.files import dataset_path, job_paths
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("service", "trainer", "clients", "bench", "scripts")
# Unpickling our own processes' messages is the only allowed use, each with the reason.
ALLOWED_PICKLE = {
    (
        "service/litserve_glue.py",
        "describe_failure",
    ): "LitServe's queue between our own processes carries a pickled "
    "exception from the generation worker; no client bytes reach it",
}
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


def _sources() -> list[Path]:
    files = []
    for folder in SOURCE_DIRS:
        files += [p for p in (REPO / folder).rglob("*.py") if ".venv" not in p.parts]
    assert len(files) > 30, files  # the scan really found the code
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _calls(path: Path):
    """(dotted name of the callee, call node, enclosing function name) for every call in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    stack: list[tuple[ast.AST, str]] = [(tree, "<module>")]
    while stack:
        node, func = stack.pop()
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
            if isinstance(child, ast.Call):
                yield _dotted(child.func), child, name
            stack.append((child, name))


def test_torch_load_only_with_weights_only_true() -> None:
    found = []
    for path in _sources():
        for callee, call, func in _calls(path):
            if callee == "torch.load" or callee.endswith(".torch.load"):
                kw = {k.arg: k.value for k in call.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                found.append((f"{path.relative_to(REPO)}:{call.lineno} in {func}", ok))
    bad = [where for where, ok in found if not ok]
    assert not bad, f"torch.load without weights_only=True: {bad}"
    assert found, "expected the trainer's checkpoint loading to be scanned"


def test_no_pickle_or_unsafe_deserializer_on_user_data() -> None:
    unsafe = (
        "pickle.load",
        "pickle.loads",
        "pickle.Unpickler",
        "cPickle.load",
        "dill.load",
        "dill.loads",
        "joblib.load",
        "marshal.load",
        "marshal.loads",
        "shelve.open",
        "yaml.load",
        "yaml.unsafe_load",
        "yaml.full_load",
    )
    hits, allowed_seen = [], set()
    for path in _sources():
        rel = str(path.relative_to(REPO))
        for callee, call, func in _calls(path):
            if callee in unsafe or callee.endswith(".unsafe_load"):
                if (rel, func) in ALLOWED_PICKLE:
                    allowed_seen.add((rel, func))
                    continue
                hits.append(f"{rel}:{call.lineno} {callee}() in {func}")
            if callee.endswith("np.load") or callee.endswith("numpy.load"):
                kw = {k.arg: k.value for k in call.keywords}
                if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value:
                    hits.append(f"{rel}:{call.lineno} numpy.load(allow_pickle=True) in {func}")
    assert not hits, "deserializers that run code from their input: " + "; ".join(hits)
    assert allowed_seen <= set(ALLOWED_PICKLE)


def test_adapters_are_read_as_safetensors_only() -> None:
    lora = (REPO / "service" / "engine" / "lora.py").read_text()
    assert "load_safetensors_bytes(weights_bytes)" in lora and "torch.load" not in lora
    assert store.WEIGHTS_FILE == "adapter_model.safetensors"
    with pytest.raises(ApiError) as err:  # a pickle (what torch.save writes) is not accepted as weights
        store.parse_safetensors_header(b"\x80\x04\x95" + b"\x00" * 64)
    assert err.value.status == 422 and err.value.param == "adapter_model"


def test_api_key_comparison_is_constant_time() -> None:
    source = inspect.getsource(auth.key_matches)
    assert "hmac.compare_digest" in source and "==" not in source
    key = "k3y-0123456789abcdef"
    assert auth.key_matches(key, key)
    same_length = [key[:-1] + "x", "x" + key[1:], key.upper(), key[::-1], "\0" * len(key), " " * len(key)]
    assert all(len(k) == len(key) for k in same_length)
    assert not any(auth.key_matches(k, key) for k in same_length)
    assert not auth.key_matches(None, key) and not auth.key_matches("", key)
    assert not auth.key_matches(key + " ", key) and not auth.key_matches(key[:-1], key)
    assert not auth.key_matches("kéy-0123456789abcdef", key)  # non-ASCII does not crash compare_digest


@FAST
@given(st.text(min_size=0, max_size=80))
def test_every_accepted_adapter_name_stays_in_the_adapter_dir(name: str) -> None:
    root = Path("/srv/adapters")
    accepted = adapter_name_problem(name) is None
    # The three places that check names agree (the API, the job routes, the worker's cache).
    assert accepted == worker_valid_name(name)
    try:
        validate.check_adapter_name(name)
        assert accepted
    except ApiError:
        assert not accepted
    if accepted:
        path = store.adapter_path(root, name)
        assert path.parent == root and path.name == name and not name.startswith(".")
        assert "/" not in name and "\0" not in name and ".." not in name and len(name) <= 64


@pytest.mark.parametrize(
    "name", ["..", ".", "../x", "a/b", "/etc", "a\0b", "a" * 300, "", ".staging", "a..b", "x\n"]
)
def test_bad_adapter_names_are_refused_everywhere(name: str) -> None:
    assert adapter_name_problem(name) is not None and not worker_valid_name(name)
    with pytest.raises(ApiError) as err:
        store.check_name(name)
    assert err.value.status == 422 and err.value.code == "invalid_adapter_name"


@FAST
@given(st.text(max_size=40))
def test_job_and_dataset_ids_cannot_become_paths_outside_the_data_dir(ident: str) -> None:
    settings_ = Settings(data_dir=Path("/srv/data"), adapter_dir=Path("/srv/adapters"))
    for make, folder in ((job_paths, "jobs"), (dataset_path, "datasets")):
        try:
            result = make(settings_, ident)
        except ValueError:
            continue
        path = result.root if hasattr(result, "root") else result
        assert path.parent == settings_.data_dir / folder and "/" not in ident and ".." not in ident


def _safetensors(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@FAST
@given(st.binary(max_size=512))
def test_safetensors_parser_answers_422_on_any_bytes(raw: bytes) -> None:
    shape = BaseLayout.gpt2(2, 64, 256)
    config = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}).encode()
    for weights in (raw, struct.pack("<Q", len(raw)) + raw):
        try:
            store.validate_upload(config, weights, shape)
        except ApiError as exc:
            assert exc.status == 422 and exc.message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FAST
@given(st.dictionaries(st.text(max_size=70), json_values, max_size=4))
def test_safetensors_parser_answers_422_on_any_header(header: dict) -> None:
    shape = BaseLayout.gpt2(2, 64, 256)
    config = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}).encode()
    try:
        store.validate_upload(config, _safetensors(header, b"\0" * 64), shape)
    except ApiError as exc:
        assert exc.status == 422 and exc.message
