"""The teacher run online: a no-grad forward inside the training step, as published VLM distillation code runs it
(LLaVA-KD, LLaVA-MoD, Align-KD, TRL's GOLD), instead of reading an extracted cache.

It computes the targets through the very path `train_cuda.extract` caches (`targets.plan_sample` ->
`Teacher.forward` -> `targets.targets_from_forward`) and returns them as the cache gives them back (`as_stored`:
float16 states), so the loss cannot tell the two modes apart; `view()` wraps them in a `MemoryCache` that
`gather_targets`, `plan_logits` and `cache_layer_map` read like a `CacheReader`.

    teacher = OnlineTeacher("llava-hf/llava-1.5-7b-hf", proc, layers=[-1, 16], image_root="img/", load_4bit=True)
    targets = teacher.view(records_of_this_batch, batch.ids)           # per step, before the student's forward
    d = gather_targets(targets, batch, proc.image_token_id, layers, plan)
"""

from __future__ import annotations

from bonsai_mlx.core.processing import Processor
from bonsai_mlx.core.records import BadSample, record_ids
from bonsai_mlx.core.teacher_cache import Entry, MemoryCache, as_stored, vocab_fingerprint
from train_cuda.targets import Plan, load_pixels, plan_sample, targets_manifest, teacher_targets
from train_cuda.teacher import Teacher


class OnlineTeacher:
    """A Llava teacher loaded once (per rank), frozen: eval mode, no parameter requiring grad, every forward under
    no_grad; bf16 on CUDA (the LM in NF4 with `load_4bit`), SDPA or FlashAttention-2; float32 on the CPU."""

    def __init__(
        self,
        teacher: str,
        student: Processor,
        layers: list[int],
        image_root: str | None = None,
        logits_topk: int = 0,
        load_4bit: bool = False,
        dtype: str | None = None,
        device: str | None = None,
    ):
        self.teacher = Teacher.load(teacher, dtype, load_4bit, device=device)
        self.teacher.model.eval().requires_grad_(False)  # frozen: no optimizer state, no autograd graph
        self.student, self.layers, self.image_root = student, [int(x) for x in layers], image_root
        self.s_grid = student.config.vision.grid
        self.manifest = targets_manifest(self.teacher, student, self.layers, logits_topk)
        self.root = f"online teacher {teacher}"
        self.same_vocab = vocab_fingerprint(self.teacher.tokenizer) == vocab_fingerprint(student.tokenizer)
        self.bad: dict[str, str] = {}  # samples the teacher could not align or load, and why (they get no targets)
        self._tokens = None

    @classmethod
    def wrap(cls, teacher: Teacher, layers: list[int], student_grid: int, logits_topk: int = 0) -> OnlineTeacher:
        """A teacher already in memory, for callers that make their own plans (`targets_for_plans`): benchmarks."""
        self = cls.__new__(cls)
        self.teacher, self.student, self.layers, self.image_root = teacher, None, [int(x) for x in layers], None
        self.s_grid, self.root, self.same_vocab, self.bad, self._tokens = (
            student_grid,
            "online teacher",
            False,
            {},
            None,
        )
        self.manifest = {"layers": self.layers, "hidden_size": teacher.model.config.text_config.hidden_size}
        if logits_topk:
            self.manifest["logits"] = {"topk": logits_topk}
        return self

    @property
    def logits_topk(self) -> int:
        return int((self.manifest.get("logits") or {}).get("topk") or 0)

    def teacher_tokens(self):
        """As `CacheReader.teacher_tokens`: (the bytes each teacher token stands for, its byte-fallback ids)."""
        from bonsai_mlx.core.vocab_map import fallback_ids, token_bytes

        if not self.logits_topk:
            return None
        if self._tokens is None:
            tok = self.teacher.tokenizer
            vocab = self.teacher.config.text_config.vocab_size
            self._tokens = (token_bytes(tok, vocab), set(fallback_ids(tok)))
        return self._tokens

    def plans(self, records: list[dict], sids: list[str] | None = None) -> list[Plan]:
        """The alignment of each record (teacher ids, units, answer starts); unusable ones go to `bad`."""
        sids = record_ids(records) if sids is None else sids
        out = []
        for rec, sid in zip(records, sids, strict=True):
            try:
                p = plan_sample(rec, self.teacher, self.student, self.image_root, sid)
            except (BadSample, ValueError) as e:
                self.bad[sid] = str(e)
                continue
            if not self.same_vocab:
                p.same_next = []
            out.append(p)
        return out

    def pixels(self, plans: list[Plan]) -> dict:
        """The plans' images as the teacher sees them (padded to square, its processor): what a data loader's
        prefetch thread can prepare for `targets_for_plans` while the previous step runs."""
        return load_pixels(self.teacher, plans, self.bad)

    def targets_for_plans(self, plans: list[Plan], pixels: dict | None = None) -> dict[str, Entry]:
        """One no-grad teacher forward per kind of sample (with images / text only) -> targets as stored."""
        if not plans:
            return {}
        pixels = self.pixels(plans) if pixels is None else pixels
        out = teacher_targets(self.teacher, plans, self.layers, self.s_grid, self.bad, self.logits_topk, pixels)
        return {sid: as_stored(e) for sid, e in out.items()}

    def targets(self, records: list[dict], sids: list[str] | None = None) -> dict[str, Entry]:
        """{sample id: Entry} for these records: exactly what `CacheReader.get` gives for them from a cache that
        `train_cuda.extract` made with the same teacher, layers and --logits-topk (no PCA)."""
        return self.targets_for_plans(self.plans(records, sids))

    def view(self, records: list[dict], sids: list[str] | None = None) -> MemoryCache:
        """These records' targets as a cache-like object (`gather_targets(view, batch, ...)`, `plan_logits`)."""
        return MemoryCache(self.manifest, self.targets(records, sids), self.teacher_tokens(), self.root)
