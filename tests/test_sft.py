"""Stage 1 (`tether sft`): which tokens are targets, the loss on hand-computed numbers, packing
with correct boundaries, truncation counts, full / LoRA / merged outputs that
`AutoModelForCausalLM` loads, gradient checkpointing, and the output-folder rules."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path

import pytest
import torch

from tether.config import ConfigError
from tether.data.records import Demonstration, Message
from tether.data.templates import Truncation
from tether.models.packing import pack_by_length
from tether.stages.sft import (
    IGNORE_INDEX,
    SFTCollator,
    SFTConfig,
    packed_rows,
    response_labels,
    tokenize_demonstrations,
    train_sft,
)

WORDS = "alpha beta gamma delta river stone cloud light paper green".split()

LIMITS = Truncation(max_length=512, max_prompt_length=256)  # the stages' defaults


def _demos(n: int, seed: int = 0) -> list[Demonstration]:
    rng = random.Random(seed)
    return [
        Demonstration(
            prompt=" ".join(rng.choices(WORDS, k=rng.randint(1, 8))),
            completion=" ".join(rng.choices(WORDS, k=rng.randint(1, 9))),
        )
        for _ in range(n)
    ]


def _tiny(tiny_model_dir, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn)


# ------------------------------------------------------------------------------------------------
# targets and the loss


def test_labels_cover_the_response_and_its_stop_token_only(tokenizer):
    ids = [11, 12, 13, 21, 22, 2]
    assert response_labels(ids, 3) == [IGNORE_INDEX] * 3 + [21, 22, 2]
    assert response_labels(ids, 0)[0] == IGNORE_INDEX  # nothing predicts the first token of an example
    demo = Demonstration(prompt=(Message("user", "Name a colour."),), completion="Green.")
    example = tokenize_demonstrations(tokenizer, [demo], LIMITS).examples[0]
    targets = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(targets) == "Green.<|im_end|>"
    assert targets[-1] == tokenizer.eos_token_id == tokenizer.pad_token_id  # the stop token is a target


def _loss_and_logit_grads(model, batch):
    out = model(**batch)
    out.logits.retain_grad()
    out.loss.backward()
    model.zero_grad()
    return out.loss.detach(), out.logits.grad


def test_prompt_tokens_never_move_the_targets_and_loss_matches_hand_computation(tiny_model_dir, tokenizer):
    model = _tiny(tiny_model_dir)
    demos = [Demonstration("river stone cloud", "paper green"), Demonstration("alpha", "beta gamma delta light")]
    examples = tokenize_demonstrations(tokenizer, demos, LIMITS).examples
    batch = SFTCollator(tokenizer.pad_token_id)(examples)
    loss, grads = _loss_and_logit_grads(model, batch)

    # hand computation: mean over target tokens of -log softmax(logits at t-1)[token t]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []
    for b, ex in enumerate(examples):
        for t, target in enumerate(ex["labels"]):
            if target != IGNORE_INDEX:
                terms.append(-torch.log_softmax(logits[b, t - 1].double(), -1)[target].item())
    n_targets = sum(len(d) for d in [[t for t in ex["labels"] if t != IGNORE_INDEX] for ex in examples])
    assert len(terms) == n_targets == 2 + 1 + 4 + 1  # both responses plus their stop tokens
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)

    # the gradient reaches exactly the positions that predict a response token (or its stop token)
    def target_positions(g):
        return {(b, t) for b, t in (g.abs().sum(-1) > 0).nonzero().tolist()}

    expected = {(b, t - 1) for b, ex in enumerate(examples) for t, y in enumerate(ex["labels"]) if y != IGNORE_INDEX}
    assert target_positions(grads) == expected
    # change each prompt token in turn: all variants in one batch, each row keeps its own targets
    rng = random.Random(0)
    variants, owners = [], []
    for b, ex in enumerate(examples):
        n_prompt = next(t for t, y in enumerate(ex["labels"]) if y != IGNORE_INDEX)
        for i in range(n_prompt):
            ids = list(ex["input_ids"])
            ids[i] = rng.randrange(100, 40000)
            variants.append({"input_ids": ids, "labels": ex["labels"]})
            owners.append(b)
    _, variant_grads = _loss_and_logit_grads(model, SFTCollator(tokenizer.pad_token_id)(variants))
    got = target_positions(variant_grads)
    for row, b in enumerate(owners):
        assert {t for r, t in got if r == row} == {t for r, t in expected if r == b}


def test_loss_is_log_vocab_when_the_model_predicts_uniformly(tiny_model_dir, tokenizer):
    model = _tiny(tiny_model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # every logit 0: p = 1/V for every token
    examples = tokenize_demonstrations(tokenizer, _demos(2), LIMITS).examples
    loss = model(**SFTCollator(tokenizer.pad_token_id)(examples)).loss
    assert loss.item() == pytest.approx(math.log(len(tokenizer)), abs=1e-5)  # ln 49152 = 10.8027


# ------------------------------------------------------------------------------------------------
# packing


def test_packing_respects_capacity_and_uses_every_example_once():
    lengths = [5, 9, 3, 7, 2, 8, 1, 6]
    rows = pack_by_length(lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == math.ceil(sum(lengths) / 10)  # this instance packs perfectly: 41 tokens in 5 rows
    assert rows == pack_by_length(lengths, capacity=10)
    with pytest.raises(ValueError, match="more than the row capacity"):
        pack_by_length([11], capacity=10)


def _per_example_losses(logits, labels, spans):
    """Summed token loss of each example; ``spans`` = (row, start, end) of each example."""
    logp = torch.log_softmax(logits.double(), -1)
    out = []
    for row, start, end in spans:
        total = 0.0
        for t in range(start + 1, end):
            if labels[row, t] != IGNORE_INDEX:
                total -= logp[row, t - 1, labels[row, t]].item()
        out.append(total)
    return torch.tensor(out)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_the_same_per_example_loss_as_unpacked(tiny_model_dir, tokenizer, attn):
    model = _tiny(tiny_model_dir, attn)
    examples = tokenize_demonstrations(tokenizer, _demos(7, seed=3), LIMITS).examples
    lengths = [len(e["input_ids"]) for e in examples]

    unpacked = SFTCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        logits = model(input_ids=unpacked["input_ids"], attention_mask=unpacked["attention_mask"]).logits
    reference = _per_example_losses(logits, unpacked["labels"], [(i, 0, n) for i, n in enumerate(lengths)])

    capacity = 2 * max(lengths) + 5
    groups = pack_by_length(lengths, capacity)
    rows = packed_rows(examples, capacity)
    assert len(rows) < len(examples)
    packed = SFTCollator(tokenizer.pad_token_id)(rows)
    assert "attention_mask" not in packed  # boundaries come from the position ids
    with torch.no_grad():
        packed_logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
    spans, order = [], []
    for r, group in enumerate(groups):
        start = 0
        for i in group:
            spans.append((r, start, start + lengths[i]))
            order.append(i)
            start += lengths[i]
    got = _per_example_losses(packed_logits, packed["labels"], spans)
    torch.testing.assert_close(got, reference[order], atol=1e-5, rtol=1e-6)
    # and the model's own mean loss over the batch is the same packed or not
    with torch.no_grad():
        assert model(**packed, use_cache=False).loss.item() == pytest.approx(model(**unpacked).loss.item(), abs=1e-5)

    # the check has teeth: without restarting positions, or with a KV cache (transformers then ignores
    # packed position ids), the examples see each other; training therefore runs without a cache
    with torch.no_grad():
        cached = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=True).logits
    assert (_per_example_losses(cached, packed["labels"], spans) - reference[order]).abs().max() > 1e-3
    config = SFTConfig(output_dir=str(tiny_model_dir / "unused"), model_name_or_path=str(tiny_model_dir), use_cpu=True)
    from tether.stages.sft import load_policy_for_training

    assert load_policy_for_training(config).config.use_cache is False
    with torch.no_grad():
        leaky = model(
            input_ids=packed["input_ids"],
            position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]),
            use_cache=False,
        ).logits
    assert (_per_example_losses(leaky, packed["labels"], spans) - reference[order]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# multi-turn conversations: which assistant turns are trained

THREE_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]
# SmolLM2's tokens for THREE_TURNS: 19 before "Hello.", then "Hello", ".", <|im_end|>; 14 template and
# user tokens ("Ċ<|im_start|>user Ċ 2 + 2 ? <|im_end|> Ċ <|im_start|> ass istant Ċ"), "4", <|im_end|>;
# 16 more ("... And Ġ 3 + 3 ? ..."), "6", <|im_end|>: 56 tokens.
ALL_TURNS_MASK = [False] * 19 + [True] * 3 + [False] * 14 + [True] * 2 + [False] * 16 + [True] * 2
LAST_TURN_MASK = [False] * 54 + [True] * 2


def _conversation(messages=THREE_TURNS):
    from tether.data.formats import parse_demonstration

    return parse_demonstration({"messages": messages})


def test_every_assistant_turn_and_its_stop_token_is_a_target_of_a_conversation(tokenizer):
    full_text = tokenizer.apply_chat_template(THREE_TURNS, tokenize=False)  # ends "6<|im_end|>\n"
    expected_ids = tokenizer(full_text.removesuffix("\n"), add_special_tokens=False)["input_ids"]
    stop = tokenizer.eos_token_id
    for turns, mask in (("all", ALL_TURNS_MASK), ("last", LAST_TURN_MASK)):
        example = tokenize_demonstrations(tokenizer, [_conversation()], LIMITS, turns).examples[0]
        assert example["input_ids"] == expected_ids  # as the whole conversation tokenises
        assert example["labels"] == [t if m else IGNORE_INDEX for t, m in zip(expected_ids, mask, strict=True)]
    targets = [t for t, m in zip(expected_ids, ALL_TURNS_MASK) if m]
    assert targets == [19556, 30, stop, 36, stop, 38, stop] == [*tokenizer("Hello.")["input_ids"], 2, 36, 2, 38, 2]
    assert tokenizer.decode(targets) == "Hello.<|im_end|>4<|im_end|>6<|im_end|>"


def test_single_turn_demonstrations_tokenise_exactly_as_before(tokenizer):
    import hashlib

    from tether.data.loading import load_demonstrations

    demos = load_demonstrations("embedded:demo")
    examples = tokenize_demonstrations(tokenizer, demos, LIMITS, "all").examples
    assert examples == tokenize_demonstrations(tokenizer, demos, LIMITS, "last").examples
    # sha256 of the demo's 52 tokenised demonstrations before multi-turn training existed
    digest = hashlib.sha256(json.dumps(examples).encode()).hexdigest()
    assert digest == "e1bd4ea31024905f418f5d96fae20937c82c789d7884878b3db797e45c1643ac"
    one_turn = _conversation(THREE_TURNS[-2:])  # a one-turn {"messages"} record
    assert tokenize_demonstrations(tokenizer, [one_turn], LIMITS, "all").examples == (
        tokenize_demonstrations(tokenizer, [Demonstration(one_turn.prompt, "6")], LIMITS, "last").examples
    )


def test_a_prompt_completion_record_trains_its_completion_only_like_trl(tokenizer):
    from tether.data.formats import parse_demonstration

    record = parse_demonstration({"prompt": THREE_TURNS[:-1], "completion": "6"})
    assert record == _conversation()  # the same conversation...
    example = tokenize_demonstrations(tokenizer, [record], LIMITS, "all").examples[0]
    assert [y != IGNORE_INDEX for y in example["labels"]] == LAST_TURN_MASK  # ...but only the completion trains


def test_conversation_truncation_keeps_the_masks_aligned(tokenizer):
    full = tokenize_demonstrations(tokenizer, [_conversation()], Truncation(), "all").examples[0]
    # prompt cut from the left to 30 tokens: the turn "4" survives, "Hello." does not
    cut = tokenize_demonstrations(tokenizer, [_conversation()], Truncation(max_length=512, max_prompt_length=30), "all")
    assert cut.prompts_cut == 1 and cut.dropped == 0
    assert cut.examples[0]["input_ids"] == full["input_ids"][-32:]
    assert cut.examples[0]["labels"] == [IGNORE_INDEX] + full["labels"][-31:]
    # max_length 40: the 54-token prompt would keep 38 < --min_prompt_length 64: dropped, never cut in the response
    short = tokenize_demonstrations(tokenizer, [_conversation()], Truncation(max_length=40), "all")
    assert short.prompts_cut == 0 and short.dropped == 1 and not short.examples
    # with a floor of 8 the prompt gives the 38 tokens and the final "6" keeps its stop token
    floor = tokenize_demonstrations(tokenizer, [_conversation()], Truncation(max_length=40, min_prompt_length=8), "all")
    assert floor.examples[0]["input_ids"] == full["input_ids"][-40:]
    assert floor.examples[0]["labels"] == [IGNORE_INDEX] + full["labels"][-39:]


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_option(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None  # a transcript "user: ...\nassistant: ...": no stop token after a turn
    with pytest.raises(ConfigError, match=r"demonstration 0: .*stop token '<\|im_end\|>'.*--assistant_turns last"):
        tokenize_demonstrations(plain, [_conversation()], LIMITS, "all")
    assert tokenize_demonstrations(plain, [_conversation()], LIMITS, "last").examples
    with pytest.raises(ConfigError, match="--assistant_turns 'first'"):
        SFTConfig(output_dir="unused", assistant_turns="first")


def test_packed_conversations_keep_every_turn_target(tmp_path, tiny_model_dir, tokenizer):
    conversations = [
        _conversation(),
        _conversation(THREE_TURNS[:5]),
        *[Demonstration(d.prompt, d.completion) for d in _demos(3)],
    ]
    examples = tokenize_demonstrations(tokenizer, conversations, LIMITS, "all").examples
    rows = packed_rows(examples, capacity=128)
    assert len(rows) < len(examples)
    n_targets = sum(y != IGNORE_INDEX for e in examples for y in e["labels"])
    assert (
        sum(y != IGNORE_INDEX for r in rows for y in r["labels"])
        == n_targets
        == 7 + 5 + sum(len(tokenizer(d.completion)["input_ids"]) + 1 for d in conversations[2:])
    )
    folder = train_sft(
        _config(tmp_path, tiny_model_dir, packing=True, max_length=128, num_train_epochs=1, eval_strategy="no"),
        conversations,
    )
    summary = json.loads((folder / "training_summary.json").read_text())
    assert summary["assistant_turns"] == "all" and summary["packed_rows"] == len(rows)


# ------------------------------------------------------------------------------------------------
# training and saving


def _config(tmp_path: Path, model_dir: Path, **overrides) -> SFTConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "sft"),
        model_name_or_path=str(model_dir),
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        num_train_epochs=3,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def _logits(model, tokenizer, text="alpha beta gamma"):
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_fine_tuning_learns_and_saves_a_loadable_model(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, held_out = _demos(16, seed=1), _demos(8, seed=1)[:4]  # held-out prompts seen: the loss must drop
    folder = train_sft(
        _config(
            tmp_path,
            tiny_model_dir,
            packing=True,
            max_length=128,
            save_strategy="steps",
            save_steps=3,
            per_device_train_batch_size=2,
            learning_rate=3e-2,
            keep_checkpoints=True,
        ),
        train,
        held_out,
    )
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    eval_losses = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert losses[-1] < 0.75 * losses[0]
    assert eval_losses[-1] < 0.75 * eval_losses[0]
    assert (folder / "checkpoint-3").is_dir()  # checkpoints stay in output_dir
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sft")]  # no staging folder left
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).eos_token_id == tokenizer.eos_token_id
    summary = json.loads((folder / "training_summary.json").read_text())
    assert summary["train_examples"] == 16 and summary["packed_rows"] < 16
    assert not torch.allclose(_logits(model, tokenizer), _logits(_tiny(tiny_model_dir), tokenizer))


def test_gradient_checkpointing_gives_the_same_weights(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    demos = _demos(8, seed=2)
    common = dict(num_train_epochs=1, eval_strategy="no")
    plain = train_sft(_config(tmp_path / "a", tiny_model_dir, **common), demos)
    checkpointed = train_sft(_config(tmp_path / "b", tiny_model_dir, activation_checkpointing=True, **common), demos)
    assert [
        json.loads((f / "training_summary.json").read_text())["activation_checkpointing"] for f in (plain, checkpointed)
    ] == [False, True]
    a = AutoModelForCausalLM.from_pretrained(plain).state_dict()
    b = AutoModelForCausalLM.from_pretrained(checkpointed).state_dict()
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("merge", [False, True])
def test_lora_adapter_and_merged_model_load_with_automodel(tmp_path, tiny_model_dir, tokenizer, merge):
    from transformers import AutoModelForCausalLM

    from tether.models.loading import load_causal_lm

    folder = train_sft(
        _config(
            tmp_path,
            tiny_model_dir,
            use_peft=True,
            lora_r=4,
            lora_alpha=8,
            merge_lora=merge,
            num_train_epochs=1,
            activation_checkpointing=True,
        ),
        _demos(8, seed=4),
    )
    assert (folder / "adapter_config.json").is_file() != merge
    assert (folder / "config.json").is_file() == merge
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ours = load_causal_lm(str(folder))
    base = _tiny(tiny_model_dir)
    torch.testing.assert_close(_logits(loaded, tokenizer), _logits(ours, tokenizer), atol=1e-5, rtol=1e-5)
    assert (_logits(loaded, tokenizer) - _logits(base, tokenizer)).abs().max() > 1e-4  # the adapters did train


# ------------------------------------------------------------------------------------------------
# command line and output folder


def test_sft_trains_on_the_embedded_demo_demonstrations_and_says_so_first(tmp_path, tiny_model_dir, caplog):
    from tether.cli import main

    with caplog.at_level("INFO"):
        code = main(
            [
                "sft",
                "--model_name_or_path",
                str(tiny_model_dir),
                "--dataset",
                "embedded:demo",
                "--output_dir",
                str(tmp_path / "out"),
                "--use_cpu",
                "true",
                "--max_steps",
                "1",
                "--per_device_train_batch_size",
                "2",
            ]
        )
    assert code == 0 and (tmp_path / "out" / "config.json").is_file()
    assert "demo task's data" in caplog.text
    first = next(r for r in caplog.records if r.name.startswith("tether"))
    assert first.getMessage() == "using the embedded demo task's data (embedded:demo, split train): 52 demonstrations"
    # without --dataset the stage refuses to guess
    code = main(["sft", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "none")])
    assert code == 2 and not (tmp_path / "none").exists()


def test_bad_data_leaves_no_output_folder(tmp_path, tiny_model_dir):
    from tether.cli import main

    bad = tmp_path / "demos.jsonl"
    bad.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q"}\n')
    for args, message in [(["--dataset", str(bad)], f"{bad}:2")]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(
                [
                    "sft",
                    "--model_name_or_path",
                    str(tiny_model_dir),
                    "--output_dir",
                    str(tmp_path / "out"),
                    "--use_cpu",
                    "true",
                    *args,
                ]
            )
        assert code == 2 and message in err.getvalue()
        assert not (tmp_path / "out").exists()


def test_cli_trains_from_a_file_and_refuses_to_overwrite(tmp_path, tiny_model_dir):
    from tether.cli import main

    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"prompt": d.prompt, "completion": d.completion}) + "\n" for d in _demos(12)))
    args = [
        "sft",
        "--model_name_or_path",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--use_cpu",
        "true",
        "--num_train_epochs",
        "1",
        "--report_to",
        "none",
        "--eval_split_ratio",
        "0.25",
        "--disable_tqdm",
        "true",
    ]
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert (summary["train_examples"], summary["eval_examples"]) == (9, 3)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(args) == 2
    assert "exists and is not empty" in err.getvalue()
    assert main(args + ["--overwrite_output_dir", "true"]) == 0


def test_packing_is_checked_and_refused_where_packed_examples_would_see_each_other(tmp_path, tiny_model_dir, tokenizer):
    """Llama keeps packed examples apart (transformers builds the block-diagonal mask from the restarting
    position ids); Bloom (ALiBi, no position ids) cannot, so its packed loss differs and --packing is refused."""
    from transformers import BloomConfig, BloomForCausalLM

    from tether.stages.sft import packing_difference

    examples = tokenize_demonstrations(tokenizer, _demos(6, seed=5), LIMITS).examples
    capacity = 2 * max(len(e["input_ids"]) for e in examples)
    assert packing_difference(_tiny(tiny_model_dir), examples, capacity, tokenizer.pad_token_id) < 1e-5
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4))
    with torch.no_grad():  # large weights: attention to another example moves the loss visibly
        for weight in bloom.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.5)
    assert packing_difference(bloom, examples, capacity, tokenizer.pad_token_id) > 1e-3
    config = _config(tmp_path, tiny_model_dir, packing=True, num_train_epochs=1)
    with pytest.raises(ConfigError, match="--packing true: .* use --packing false"):
        train_sft(config, _demos(6, seed=5), [], model=bloom, tokenizer=tokenizer)
    assert not (tmp_path / "sft" / "model.safetensors").exists()
