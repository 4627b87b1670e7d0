"""Damaged inputs: every truncated, bit-flipped or random file ends in a LoadError, never a crash or hang."""

import json
import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dendrite_convert as dc
from dendrite_convert.core.errors import DendriteError

FILE_FORMS = ["pickled module", "state dict", "safetensors", "torch.export .pt2", "TorchScript"]
CASES_RUN = {"files": 0, "configs": 0}


def _damage(data: bytes, how: str, seed: int) -> bytes:
    rng = random.Random(seed)
    if how == "truncate":
        return data[: rng.randrange(0, len(data))]
    if how == "random":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 4096)))
    damaged = bytearray(data)
    for _ in range(rng.randrange(1, 16)):
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
    return bytes(damaged)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=60, deadline=20_000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(form=st.sampled_from(FILE_FORMS), how=st.sampled_from(["truncate", "flip", "random"]), seed=st.integers(0, 2**32))
def test_damaged_model_files(fixture_files, scratch, form, how, seed):
    spec = fixture_files[form]
    path = scratch / f"damaged{spec['path'].suffix}"
    path.write_bytes(_damage(spec["path"].read_bytes(), how, seed))
    CASES_RUN["files"] += 1
    try:
        converted = dc.convert(path, factory=spec["factory"], allow_modules=["fixtures"],
                               trust_code=form == "TorchScript")  # consent, so that the damage itself is what is met
    except DendriteError as exc:
        assert exc.exit_code in (3, 4) and str(exc).endswith(".")
        return
    assert converted.report.targets  # flips inside tensor data still make a valid (different) model


@pytest.fixture(scope="module")
def converted_dir(fixture_files, tmp_path_factory):
    spec = fixture_files["state dict"]
    return dc.convert(spec["path"], dc.DendriteConfig(dendrites=1), factory=spec["factory"]).save(
        tmp_path_factory.mktemp("conv") / "converted")


def _mutations(config: dict):
    """Missing fields, wrong types, a future schema and escaping paths."""
    yield "future schema", {**config, "schema_version": 99}
    yield "no schema", {k: v for k, v in config.items() if k != "schema_version"}
    for key in ("source", "dendrite_config", "recipe"):
        yield f"no {key}", {k: v for k, v in config.items() if k != key}
        yield f"{key} wrong type", {**config, key: [1, 2]}
    yield "unknown source kind", {**config, "source": {**config["source"], "kind": "zip"}}
    yield "source escapes", {**config, "source": {**config["source"], "kind": "pickle", "path": "../../../etc/passwd"}}
    yield "factory gone", {**config, "source": {**config["source"], "factory": "nowhere:fn"}}
    target = config["recipe"]["targets"][0]
    for field, value in (("dendrites", -1), ("dendrites", "three"), ("dendrites", 10**9), ("name", 5)):
        bad = {**config["recipe"], "targets": [{**target, field: value}, *config["recipe"]["targets"][1:]]}
        yield f"target {field}={value!r}", {**config, "recipe": bad}
    yield "extra target", {**config, "recipe": {**config["recipe"], "targets": [*config["recipe"]["targets"], target]}}
    yield "activation", {**config, "dendrite_config": {**config["dendrite_config"], "activation": "relu"}}


def test_damaged_config_json(converted_dir, tmp_path):
    config = json.loads((converted_dir / "dendrite_config.json").read_text())
    for name, mutated in _mutations(config):
        case = tmp_path / name.replace(" ", "_")
        shutil.copytree(converted_dir, case)
        (case / "dendrite_config.json").write_text(json.dumps(mutated))
        CASES_RUN["configs"] += 1
        with pytest.raises(DendriteError, match=".") as info:
            dc.load(case, trust_code=True)
            pytest.fail(f"{name}: loaded")
        assert info.value.exit_code == 3, name
    assert dc.load(converted_dir, trust_code=True) is not None  # the untouched directory still loads


@settings(max_examples=30, deadline=20_000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=st.sampled_from(["truncate", "flip", "random"]), seed=st.integers(0, 2**32),
       victim=st.sampled_from(["dendrite_config.json", "model.safetensors"]))
def test_damaged_converted_directory(converted_dir, scratch, how, seed, victim):
    case = scratch / "case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(converted_dir, case)
    (case / victim).write_bytes(_damage((converted_dir / victim).read_bytes(), how, seed))
    CASES_RUN["configs"] += 1
    try:
        dc.load(case, trust_code=True)
    except DendriteError as exc:
        assert exc.exit_code == 3


def test_report_cases_run():
    """Printed in the test log (-rA / -s): how many damaged inputs were tried."""
    print(f"fuzzed model files: {CASES_RUN['files']}, converted-directory cases: {CASES_RUN['configs']}")
    assert CASES_RUN["files"] >= 60 and CASES_RUN["configs"] >= 40
