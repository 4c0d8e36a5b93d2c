"""Depth pruning (`opd init-student`) on the bundled tiny teacher, a 4-layer Llama."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from opd.cli import main
from opd.models import TINY_DIR, load_model, load_tokenizer
from opd.prune import by_importance, cut, even_layers, init_student, layer_importance, parse_layers

KEEP = [0, 3]


def test_cut_folder_loads_and_equals_a_hand_built_model(tmp_path, teacher):
    report = init_student("tiny:teacher", tmp_path / "s", layers="0,3")
    assert report["kept_layers"] == KEEP
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]  # renumbered for the KV cache
    assert (tmp_path / "s" / "chat_template.jinja").read_text() == (TINY_DIR / "teacher" / "chat_template.jinja").read_text()
    assert student.generation_config.eos_token_id == teacher.generation_config.eos_token_id
    # the same network built by hand: a 2-layer config, the teacher's layers 0 and 3 put in place
    hand = LlamaForCausalLM(LlamaConfig(**{**teacher.config.to_dict(), "num_hidden_layers": 2})).eval()
    hand.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    hand.model.norm.load_state_dict(teacher.model.norm.state_dict())
    for new, old in enumerate(KEEP):
        hand.model.layers[new].load_state_dict(teacher.model.layers[old].state_dict())
    hand.tie_weights()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, hand(ids).logits, rtol=0, atol=0)
        # KV-cached greedy decoding equals decoding by full forwards: the cache sees 2 layers, indexed 0 and 1
        cached = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        plain = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    assert json.loads((tmp_path / "s" / "pruned_from.json").read_text())["kept_layers"] == KEEP


def test_tokenizer_and_chat_template_shared(tmp_path):
    init_student("tiny:teacher", tmp_path / "s", keep=2)
    messages = [{"role": "user", "content": "12+34"}]
    ours, theirs = load_tokenizer(str(tmp_path / "s")), load_tokenizer("tiny:teacher")
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)
    assert ours.get_vocab() == theirs.get_vocab() and ours.eos_token_id == theirs.eos_token_id


def test_even_layers_include_both_ends():
    assert even_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert even_layers(4, 2) == [0, 3] and even_layers(4, 4) == [0, 1, 2, 3] and even_layers(4, 1) == [3]
    with pytest.raises(ValueError, match="--keep must be in"):
        even_layers(4, 5)


@pytest.mark.parametrize("text, why", [("0,4", r"\[4\] out of range"), ("1,1", "repeated"), ("a,b", "comma-separated"),
                                       ("", "empty"), ("-1,2", "out of range")])
def test_bad_layers_one_line_error(text, why):
    with pytest.raises(ValueError, match=why) as e:
        parse_layers(text, 4)
    assert "\n" not in str(e.value)


def test_cli_bad_layers_exit_2(tmp_path, capsys):
    assert main(["init-student", "--from", "tiny:teacher", "--layers", "0,7", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("opd init-student: error: --layers '0,7': [7] out of range") and "(the teacher has 4 layers)" in err
    assert not (tmp_path / "s").exists()


def test_model_that_cannot_be_cut():
    model = torch.nn.Linear(2, 2)
    model.config = LlamaConfig(num_hidden_layers=2)
    with pytest.raises(ValueError, match="cannot cut Linear"):
        cut(model, [0])


def test_importance_is_the_skip_one_layer_kl(teacher, tokenizer):
    # make layer 2 an identity: zero the projections that write into the residual stream (o_proj, down_proj),
    # so h + attn(h) + mlp(h) = h exactly; skipping it then changes no logprob, and its KL is exactly 0
    model = copy.deepcopy(teacher)
    layer = model.model.layers[2]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    scores = layer_importance(model, tokenizer)
    assert scores[2] == 0.0
    assert all(s > 1e-3 for i, s in enumerate(scores) if i != 2)
    assert scores == layer_importance(model, tokenizer)  # deterministic
    assert 2 not in by_importance(scores, 3)


def test_by_importance_order_and_ties():
    assert by_importance([0.5, 3.0, 0.1, 3.0], 2) == [1, 3]
    assert by_importance([1.0, 1.0, 1.0], 2) == [0, 1]  # ties go to the lower index
    assert by_importance([0.2, 0.1, 0.9, 0.3], 3) == [0, 2, 3]  # kept in network order


def test_cut_student_trains_like_any_student(tmp_path):
    """The pruned folder is an ordinary student: it loads through opd's loader, in the teacher's dtype."""
    init_student("tiny:teacher", tmp_path / "s", keep=3, by="importance")
    student = load_model(str(tmp_path / "s"))
    assert student.config.num_hidden_layers == 3 and next(student.parameters()).dtype == torch.float32
    report = json.loads((tmp_path / "s" / "pruned_from.json").read_text())
    assert report["by"] == "importance" and len(report["importance_kl_nats_per_token"]) == 4
    assert report["kept_layers"] == by_importance(report["importance_kl_nats_per_token"], 3)
