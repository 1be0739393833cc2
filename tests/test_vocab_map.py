"""Which tokens two vocabularies share (bonsai_mlx.core.vocab_map), on hand cases and on the real Qwen2.5 and
Llama/Mistral SentencePiece vocabularies."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bonsai_mlx.core.vocab_map import (
    SharedVocab,
    build_shared_vocab,
    choose_kl_mode,
    decode_tokens,
    encode_tokens,
    piece_bytes,
    shared_vocab_of,
    token_bytes,
)

# Real English prose (the project's own description of itself): what the shared tokens' share of a text is measured on.
PROSE = (
    "Pico is a sub-1B vision-language model that a person can train and run on a laptop, and improve with a big "
    "teacher on a rented GPU. Teacher and student tokenize differently, so hidden states are compared on units both "
    "can see: text spans and image regions. When they share a vocabulary, logit distillation compares their "
    "next-token distributions directly; when they don't, it compares them through the tokens whose strings are "
    "equal, or through their probabilities sorted from the most likely down.\n"
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it? Yes -- and 42% of 1,024 is 430.08!\n"
)


def test_pieces_decode_to_the_bytes_they_stand_for():
    assert piece_bytes("▁the", "sentencepiece") == piece_bytes("Ġthe", "byte-level") == b" the"
    assert piece_bytes("<0x0A>", "sentencepiece") == piece_bytes("Ċ", "byte-level") == b"\n"
    assert piece_bytes("<0xE6>", "sentencepiece") == b"\xe6" == piece_bytes("æ", "byte-level")
    assert piece_bytes("æ¢¦", "byte-level") == "梦".encode() == piece_bytes("梦", "sentencepiece")
    assert piece_bytes("hello", "plain") == b"hello"
    with pytest.raises(ValueError, match="unknown token scheme"):
        piece_bytes("x", "wordpiece")


def test_shared_map_pairs_equal_strings_one_to_one_preferring_regular_pieces():
    # teacher (SentencePiece-like): 0 <s> (special), 1 byte piece b" ", 2 "▁", 3 "▁the", 4 "cat", 5 byte b"\n"
    teacher = [None, b" ", b" ", b" the", b"cat", b"\n"]
    # student (byte-level-like): 0 " the", 1 "\n", 2 " ", 3 "dog", 4 <|im_end|> (special)
    student = [b" the", b"\n", b" ", b"dog", None]
    sv = build_shared_vocab(teacher, student, teacher_fallback={1, 5})
    pairs = dict(zip(sv.teacher_ids.tolist(), sv.student_ids.tolist(), strict=True))
    # " " goes to the regular piece 2, not the byte piece 1 (which the teacher never emits for a space);
    # "\n" exists only as a byte piece on the teacher side, so that one is used
    assert pairs == {2: 2, 3: 0, 5: 1}
    assert sv.n_teacher == 4 and sv.n_student == 4 and sv.coverage == 3 / 4
    np.testing.assert_array_equal(sv.student_of(np.array([[3, 4, 0, 2]])), [[0, -1, -1, 2]])


def test_mass_coverage_is_the_teacher_probability_on_shared_tokens():
    sv = SharedVocab(np.array([1, 3]), np.array([0, 1]), 4, 2)
    ids = np.array([[1, 2, 3], [2, 0, 1]])
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]))
    # unit 1 keeps .5 + .2, unit 2 keeps .1
    assert abs(sv.mass_coverage(ids, logits) - (0.7 + 0.1) / 2) < 1e-9
    # against the whole distribution (its logsumexp given): these top-3 hold half of each unit's mass
    assert abs(sv.mass_coverage(ids, logits, np.log([2.0, 2.0])) - 0.4 / 2) < 1e-9


def test_token_strings_round_trip_through_json_and_bad_entries_are_named():
    tokens = [None, b" the", b"\xe6", "梦".encode(), b"\n"]
    assert decode_tokens(json.loads(json.dumps(encode_tokens(tokens)))) == tokens
    with pytest.raises(ValueError, match="teacher_tokens.json: entry 1 is 3"):
        decode_tokens([None, 3], "teacher_tokens.json")


def test_auto_mode_picks_by_vocabulary_and_coverage_and_says_why():
    assert choose_kl_mode("auto", True, None)[0] == "same-vocab"
    mode, why = choose_kl_mode("auto", False, 0.83)
    assert mode == "shared-vocab" and "83.0%" in why
    mode, why = choose_kl_mode("auto", False, 0.2)
    assert mode == "uld" and "20.0%" in why
    assert choose_kl_mode("auto", False, None)[0] == "uld"
    assert choose_kl_mode("uld", True, None) == ("uld", "as asked")
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        choose_kl_mode("same-vocab", False, 0.9)
    with pytest.raises(ValueError, match="re-extract it with --logits-topk"):
        choose_kl_mode("shared-vocab", False, None)
    with pytest.raises(ValueError, match="--kl-mode must be one of"):
        choose_kl_mode("wasserstein", False, None)


def _mistral_sentencepiece(out: Path):
    """The Llama/Mistral-7B SentencePiece vocabulary (32,000 pieces) that `mistral-common` ships, as a HF folder."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common is not installed (pip install -e '.[dev]')")
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1", out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return AutoTokenizer.from_pretrained(str(out))


@pytest.fixture(scope="module")
def real_vocabs(tmp_path_factory):
    """(Llama/Mistral SentencePiece, Qwen2.5) tokenizers, built once for this module (Qwen's takes seconds)."""
    from bonsai_mlx.qwen_vocab import build_qwen25_tokenizer

    root = tmp_path_factory.mktemp("vocabs")
    llama = _mistral_sentencepiece(root / "llama")
    return llama, build_qwen25_tokenizer(root / "qwen")


def test_the_real_qwen25_and_llama_vocabularies_share_most_text_tokens(real_vocabs):
    """The figure the README quotes: Llama-style SentencePiece (teacher) against Qwen2.5's byte-level BPE."""
    llama, qwen = real_vocabs
    assert len(llama) == 32000 and len(qwen) > 151643
    sv = shared_vocab_of(llama, qwen)
    ids = llama(PROSE, add_special_tokens=False)["input_ids"]
    on_text = float((sv.student_of(np.array(ids)) >= 0).mean())
    print(
        f"shared: {len(sv):,} of {sv.n_teacher:,} Llama text tokens ({sv.coverage:.2%}), "
        f"{on_text:.2%} of the {len(ids)} Llama tokens of the prose"
    )
    # distinct strings of the 31,997 non-control pieces: 125 byte pieces repeat a regular one-character piece
    assert sv.n_teacher == 31872
    assert 0.88 < sv.coverage < 0.95
    assert on_text > 0.95
    # the same string on each side, whatever the writing: '▁the' / 'Ġthe', byte piece '<0x0A>' / 'Ċ', CJK
    pairs = dict(zip(sv.teacher_ids.tolist(), sv.student_ids.tolist(), strict=True))
    llama_bytes = token_bytes(llama)
    for text in (" the", "\n", " cat", "梦"):
        t = [i for i, b in enumerate(llama_bytes) if b == text.encode()]
        assert t, text
        s_id = pairs[min(t, key=lambda i: (llama.convert_ids_to_tokens(i).startswith("<0x"), i))]
        assert qwen.convert_tokens_to_string([qwen.convert_ids_to_tokens(s_id)]) == text
    # control tokens stand for no text and are never shared
    assert not set(llama.all_special_ids) & set(sv.teacher_ids.tolist())
    assert not set(qwen.all_special_ids) & set(sv.student_ids.tolist())


def test_an_answer_start_compares_llamas_spaced_token_with_qwens_bare_one(real_vocabs):
    """Vicuna's "ASSISTANT: red" gives Llama '▁red' after ':'; ChatML's "assistant\nred" gives Qwen 'red' after
    the newline. Both predict the answer there: the unit is kept, flagged to drop the teacher's space, and the
    stripped map pairs '▁red' with 'red' (the plain map pairs it with 'Ġred')."""
    from bonsai_mlx.core.vocab_map import build_shared_vocab, fallback_ids
    from train_cuda.extract import answer_start

    llama, qwen = real_vocabs
    t_text = "USER: What colour is it? ASSISTANT: red circle</s>"
    s_text = "<|im_start|>user\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\nred circle<|im_end|>\n"
    t = llama(t_text, add_special_tokens=False, return_offsets_mapping=True)
    s = qwen(s_text, add_special_tokens=False, return_offsets_mapping=True)
    ts, ss = t_text.index("red"), s_text.index("red")
    got = answer_start(
        llama,
        t["input_ids"],
        t["offset_mapping"],
        (ts, ts + 10),
        qwen,
        s["input_ids"],
        s["offset_mapping"],
        (ss, ss + 10),
        "red circle",
    )
    assert got is not None
    tp, sp, strip = got
    assert strip and llama.convert_ids_to_tokens(t["input_ids"][tp + 1]) == "▁red"
    assert qwen.convert_ids_to_tokens(s["input_ids"][sp + 1]) == "red"
    t_bytes, s_bytes = token_bytes(llama), token_bytes(qwen)
    stripped = [b[1:] if b is not None and b.startswith(b" ") else None for b in t_bytes]
    red = t["input_ids"][tp + 1]
    m = build_shared_vocab(stripped, s_bytes, fallback_ids(llama), fallback_ids(qwen)).student_of(np.array([red]))
    assert qwen.convert_ids_to_tokens(int(m[0])) == "red"
    plain = shared_vocab_of(llama, qwen).student_of(np.array([red]))
    assert qwen.convert_ids_to_tokens(int(plain[0])) == "Ġred"
