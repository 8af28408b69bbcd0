"""The contract of modeling_llama4.upstream: every private upstream name the package uses exists on the installed
releases, with the parameters or op schema the code relies on. Seconds, no torchrun."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from transformers.distributed.tensor_parallel import TensorParallelLayer
from transformers.modeling_utils import PreTrainedModel

from modeling_llama4.upstream import UPSTREAM_NAMES, UpstreamName, contract_violation

PACKAGE = Path(__file__).resolve().parents[1] / "modeling_llama4"
BY_PATH = {entry.path: entry for entry in UPSTREAM_NAMES}


@pytest.mark.parametrize("entry", UPSTREAM_NAMES, ids=lambda entry: entry.path)
def test_upstream_name_keeps_its_contract(entry: UpstreamName):
    if entry.path.startswith("peft."):
        pytest.importorskip("peft")
    assert contract_violation(entry) is None, f"{contract_violation(entry)} (used in {entry.used_in})"


def test_every_entry_states_one_expectation():
    for entry in UPSTREAM_NAMES:
        expectations = [bool(entry.parameters), entry.schema is not None]
        assert expectations.count(True) == 1, entry.path
        assert entry.serves and entry.purpose and entry.used_in, entry.path


def test_every_torch_op_the_package_calls_is_listed():
    called = set()
    for source in PACKAGE.glob("*.py"):
        called |= set(re.findall(r"torch\.ops\.(\w+)\.(\w+)", source.read_text(encoding="utf-8")))
    listed = {tuple(path.split(".")[2:4]) for path in BY_PATH if path.startswith("torch.ops.")}
    assert called and called <= listed, sorted(called - listed)


# --- the contract test fails when upstream moves a name --------------------------------------------------------------


def test_contract_fails_on_a_renamed_method(monkeypatch):
    entry = BY_PATH["transformers.distributed.tensor_parallel.TensorParallelLayer.install_forward"]
    monkeypatch.delattr(TensorParallelLayer, "install_forward")
    with pytest.raises(AssertionError, match="install_forward is gone"):
        test_upstream_name_keeps_its_contract(entry)


def test_contract_fails_on_new_parameters(monkeypatch):
    entry = BY_PATH["transformers.modeling_utils.PreTrainedModel._load_pretrained_model"]

    def resigned(model, state_dict, checkpoint_files, load_config, expected_keys=None, *, key_mapping=None):
        raise NotImplementedError

    monkeypatch.setattr(PreTrainedModel, "_load_pretrained_model", staticmethod(resigned))
    with pytest.raises(AssertionError, match=r"takes \(.*'key_mapping'\), expected one of"):
        test_upstream_name_keeps_its_contract(entry)


def test_contract_fails_on_a_renamed_op_or_a_new_schema():
    entry = BY_PATH["torch.ops.aten._weight_int4pack_mm_for_cpu.default"]
    renamed = dataclasses.replace(entry, path="torch.ops.aten._weight_int4pack_mm_for_cpu_v2.default")
    with pytest.raises(AssertionError, match="_v2.default is gone"):
        test_upstream_name_keeps_its_contract(renamed)
    installed = str(torch.ops.aten._weight_int4pack_mm_for_cpu.default._schema)
    resigned = dataclasses.replace(entry, schema=installed.replace("int qGroupSize", "SymInt qGroupSize"))
    with pytest.raises(AssertionError, match="has schema .*int qGroupSize.*expected .*SymInt qGroupSize"):
        test_upstream_name_keeps_its_contract(resigned)


def test_an_entry_since_a_newer_release_is_checked_from_that_release_on():
    missing = UpstreamName(
        path="transformers.no_such_name", serves="-", purpose="-", used_in="-", parameters={"x": ()}
    )
    assert contract_violation(dataclasses.replace(missing, since="99.0")) is None
    assert "is gone" in contract_violation(dataclasses.replace(missing, since="5.0"))
