from dataclasses import dataclass

import pytest

from specx.errors import ContractError
from specx.graphs.contract import GraphContract


@dataclass
class Arg:
    name: str
    type: str
    shape: list


def _args(specs, override=None):
    types = {"int64": "tensor(int64)", "bool": "tensor(bool)", "float32": "tensor(float)", "float16": "tensor(float16)"}
    args = [Arg(s.name, types[s.dtype], list(s.shape)) for s in specs]
    if override:
        override(args)
    return args


def test_decoder_contract_names_follow_optimum():
    c = GraphContract.decoder(2, 3, 8, 100, "float32")
    assert [t.name for t in c.inputs[:3]] == ["input_ids", "position_ids", "tree_mask"]
    assert c.past_input_names == ("past_key_values.0.key", "past_key_values.0.value",
                                  "past_key_values.1.key", "past_key_values.1.value")
    assert c.present_output_names[0] == "present.0.key"
    assert c.outputs[0].shape == ("batch", "seq", 100)


def test_round_trip():
    c = GraphContract.decoder(2, 3, 8, 100, "float16")
    assert GraphContract.from_dict(c.to_dict()) == c
    g = c.kv_commit()
    assert GraphContract.from_dict(g.to_dict()) == g


def test_check_session_accepts_matching_io():
    c = GraphContract.decoder(1, 2, 4, 50, "float32")
    c.check_session(_args(c.inputs), _args(c.outputs), "g")


def test_check_session_rejects_mismatches():
    c = GraphContract.decoder(1, 2, 4, 50, "float32")

    def drop(args):
        args.pop()

    def wrong_type(args):
        args[0].type = "tensor(int32)"

    def wrong_dim(args):
        args[-1].shape[1] = 7

    for override in (drop, wrong_type, wrong_dim):
        with pytest.raises(ContractError):
            c.check_session(_args(c.inputs, override), _args(c.outputs), "g")


def test_bad_contract_dicts():
    d = GraphContract.decoder(1, 2, 4, 50, "float32").to_dict()
    with pytest.raises(ContractError, match="version"):
        GraphContract.from_dict({**d, "contract_version": 99})
    with pytest.raises(ContractError, match="malformed"):
        GraphContract.from_dict({k: v for k, v in d.items() if k != "inputs"})
    with pytest.raises(ContractError, match="KV dtype"):
        GraphContract.from_dict({**d, "kv_dtype": "int8"})
