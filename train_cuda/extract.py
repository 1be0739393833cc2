"""python -m train_cuda.extract: run the teacher once and cache its hidden states at aligned units.

Before the teacher loads, it checks the cache's manifest against these inputs, estimates the size for the
planned samples and the whole data, and refuses when the disk cannot hold it. Resumable (finished shards are
skipped), never deletes a shard (replacing a cache takes --overwrite), and runs on several GPUs with
`accelerate launch -m train_cuda.extract ...` (each rank its own shards; the manifest completed once all
finish). Writes a cache that `train_cuda.distill` and `bonsai_mlx.train --stage distill` both read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bonsai_mlx.core.config import PicoConfig
from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.processing import Processor
from bonsai_mlx.core.provenance import check_space, data_fingerprint, estimate_bytes, free_bytes, human
from bonsai_mlx.core.records import BadSample, read_records, record_ids
from bonsai_mlx.core.teacher_cache import TOKENS_FILE, CacheWriter, check_resume, full_manifest, vocab_fingerprint
from bonsai_mlx.core.vocab_map import encode_tokens, fallback_ids, shared_vocab_of, token_bytes
from train_cuda.targets import (  # noqa: F401  (re-exported: the names this module has always offered)
    Plan,
    answer_start,
    load_pixels,
    plan_sample,
    pool_images,
    prefetched,
    targets_manifest,
    teacher_targets,
)
from train_cuda.teacher import Teacher

ESTIMATE_SAMPLES = 256  # records planned up front to estimate the cache's size


def extract_batch(teacher, batch, layers, s_grid, bad, topk: int = 0, pixels=None):
    """Targets of one batch (kept under its old name: `targets.teacher_targets`)."""
    return teacher_targets(teacher, batch, layers, s_grid, bad, topk, pixels)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train_cuda.extract", description=__doc__)
    ap.add_argument("--teacher", required=True, help="teacher Llava directory or hub id (llava-hf/llava-1.5-7b-hf)")
    ap.add_argument("--data", required=True, help="LLaVA JSON/JSONL, a datasets directory or a hub dataset id")
    ap.add_argument("--image-root")
    ap.add_argument("--student-tokenizer", required=True, help="the student Pico directory (tokenizer, template, grid)")
    ap.add_argument("--layers", default="-1", help="teacher hidden_states indices, e.g. -1,16")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true", help="replace a cache in --out made from other inputs")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", default=None, help="teacher compute dtype on GPU (default bfloat16)")
    ap.add_argument("--load-4bit", action="store_true", help="teacher in bitsandbytes NF4 (GPU only)")
    ap.add_argument("--max-samples", type=int)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--pca", type=int, metavar="K", help="store K PCA coordinates per state instead of all of them")
    ap.add_argument("--pca-samples", type=int, default=256, help="samples the PCA basis is fitted on")
    ap.add_argument(
        "--logits-topk",
        "--kl-topk",
        dest="logits_topk",
        type=int,
        default=0,
        metavar="K",
        help="also store the teacher's top-K next-token logits at every aligned text unit and answer start, and "
        "its token strings (for distill --kl in any --kl-mode: same vocabulary or not)",
    )
    from bonsai_mlx.core.errors import glue_negative_lists

    a = ap.parse_args(glue_negative_lists(sys.argv[1:] if argv is None else argv, ("--layers",)))
    from bonsai_mlx.core.errors import friendly

    with friendly("extract"):
        return run(a)


def _ranks():
    """(process index, process count, device, barrier) under `accelerate launch`; (0, 1, None, no-op) alone."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None, lambda: None
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator reads it
    dev = str(state.device) if state.device.type == "cuda" else "cpu"
    return state.process_index, state.num_processes, dev, state.wait_for_everyone


def _plans(records, ids, positions, teacher, student, image_root, bad, same_vocab: bool) -> list[Plan]:
    """Plans of the records at `positions` (bad ones go to `bad`): made when needed, never all at once."""
    out = []
    for i in positions:
        try:
            p = plan_sample(records[i], teacher, student, image_root, ids[i])
        except (BadSample, ValueError) as e:
            bad[ids[i]] = str(e)
            continue
        if not same_vocab:
            p.same_next = []  # ids of two vocabularies never compare, even where the numbers happen to be equal
        out.append(p)
    return out


def estimate(plans: list[Plan], n_probe: int, topk: int, layers: list[int], width: int, s_grid: int) -> float:
    """Mean bytes a planned record takes in the cache (records that could not be planned count as none)."""
    total = 0
    for p in plans:
        logit_units = len(p.pairs) + len(p.starts)
        total += estimate_bytes(len(p.pairs), s_grid * s_grid if p.image else 0, len(layers), width, logit_units, topk)
    return total / max(n_probe, 1)


def run(a) -> int:
    from tqdm import tqdm

    rank, world, device, barrier = _ranks()
    say = print if rank == 0 else (lambda *x, **k: None)
    layers = [int(x) for x in a.layers.split(",")]
    if a.logits_topk < 0:
        raise UserError(f"--logits-topk must be a positive number of logits per unit, got {a.logits_topk}")
    sdir = Path(a.student_tokenizer)
    student = Processor(sdir, PicoConfig.load(sdir))
    s_grid = student.config.vision.grid
    teacher = Teacher.load(a.teacher, a.dtype, a.load_4bit, device=device, weights=False)
    records = read_records(a.data)
    ids = record_ids(records, a.data)  # over the whole file: the trainers key the same records the same way
    planned = ids[: a.max_samples]
    manifest = targets_manifest(teacher, student, layers, a.logits_topk)
    hidden = manifest["hidden_size"]
    width = min(a.pca, hidden) if a.pca else hidden
    manifest.update(
        {
            # what the cache was made from: a resume with other inputs is refused (--overwrite replaces it)
            "data": data_fingerprint(a.data),
            "data_path": str(a.data),
            "image_root": str(Path(a.image_root).resolve()) if a.image_root else None,
            "teacher_dtype": str(teacher.dtype).removeprefix("torch."),
            "load_4bit": bool(a.load_4bit),
            "max_samples": a.max_samples,
        }
    )
    if a.pca:
        manifest["pca"] = width
    # refused before anything loads, on every rank alike: a cache made from other inputs (unless --overwrite)
    replace = check_resume(a.out, full_manifest(manifest, a.per_shard), a.overwrite)
    same_vocab = vocab_fingerprint(teacher.tokenizer) == vocab_fingerprint(student.tokenizer)

    # the size, before any weight loads: plan the first records, extrapolate to the planned and the whole data
    bad: dict[str, str] = {}
    n_probe = min(ESTIMATE_SAMPLES, len(planned))
    probe = _plans(records, ids, range(n_probe), teacher, student, a.image_root, {}, same_vocab)
    per = estimate(probe, n_probe, a.logits_topk, layers, width, s_grid)
    basis = len(layers) * (width + 1) * hidden * 4 if a.pca else 0
    need, whole = per * len(planned) + basis, per * len(records) + basis
    units = sum(len(p.pairs) + (s_grid * s_grid if p.image else 0) for p in probe) / max(len(probe), 1)
    have = 0 if replace else sum(p.stat().st_size for p in Path(a.out).glob("shard-*.safetensors"))
    say(
        f"{len(planned):,} of {len(records):,} records planned; from the first {n_probe}: {units:,.0f} units a sample "
        f"x {len(layers)} layer(s) x {width} (fp16{', PCA' if a.pca else ''}) -> about {human(need)} on disk for them "
        f"(the whole data: {human(whole)}); {human(free_bytes(a.out))} free at {a.out}"
    )
    check_space(a.out, max(0, int(need - have)), f"the cache ({len(planned):,} samples)")

    # open the cache: rank 0 first (it replaces an old one with --overwrite), then the others attach
    if rank == 0:
        writer = CacheWriter(a.out, manifest, a.per_shard, overwrite=a.overwrite)
    barrier()
    if rank != 0:
        writer = CacheWriter(a.out, manifest, a.per_shard)
    shard_ids = [planned[i : i + a.per_shard] for i in range(0, len(planned), a.per_shard)]
    mine = [k for k in range(len(shard_ids)) if k % world == rank]
    todo = [k for k in mine if not writer.shard_done(k, shard_ids[k])]
    needs_basis = bool(a.pca) and not writer.has_basis()
    if not todo and not needs_basis:
        say(f"every planned shard is already in {a.out}: nothing to extract")
    else:
        teacher.load_model()
        if teacher.device == "cpu":
            say("extract: no CUDA device: running the teacher in float32 on the CPU (no 4-bit, no FlashAttention-2)")
    if a.logits_topk and rank == 0:
        vocab = teacher.config.text_config.vocab_size
        if todo or not (writer.root / TOKENS_FILE).is_file():  # a finished cache is left as it is
            writer.write_tokens(encode_tokens(token_bytes(teacher.tokenizer, vocab)), fallback_ids(teacher.tokenizer))
        shared = shared_vocab_of(teacher.tokenizer, student.tokenizer)
        say(
            f"teacher logits: top-{manifest['logits']['topk']} per aligned unit; {len(shared):,} of the teacher's "
            f"{shared.n_teacher:,} text tokens ({shared.coverage:.1%}) have an equal-string student token"
        )
    if needs_basis:
        if rank == 0:
            fit = _plans(records, ids, range(min(a.pca_samples, len(planned))), teacher, student, a.image_root, {},
                         same_vocab)  # fmt: skip
            writer.set_basis(fit_basis(teacher, fit, layers, s_grid, width, a.batch_size))
        barrier()
        if rank != 0:
            writer.load_basis()
    by_pos = {sid: i for i, sid in enumerate(ids)}
    bar = tqdm(total=sum(len(shard_ids[k]) for k in todo), desc=f"extract (rank {rank})", unit="sample")
    for k in todo:
        plans = _plans(records, ids, [by_pos[s] for s in shard_ids[k]], teacher, student, a.image_root, bad,
                       same_vocab)  # fmt: skip
        packed = {}
        for batch, pixels in prefetched(teacher, plans, a.batch_size, bad):
            for sid, e in teacher_targets(teacher, batch, layers, s_grid, bad, a.logits_topk, pixels).items():
                packed[sid] = writer.pack(sid, e)  # buffered as stored (fp16 / PCA), not float32
            bar.update(len(batch))
        writer.write_packed(k, packed, shard_ids[k])
        bar.update(len(shard_ids[k]) - len(plans))
    bar.close()
    barrier()  # every rank's shards are written: the manifest says so once
    if rank == 0:
        import json

        n = sum(len(json.loads(p.read_text()).get("entries", {})) for p in writer.root.glob("shard-*.json"))
        writer.update_manifest(samples=n, shards=len(list(writer.root.glob("shard-*.json"))))
    if bad:
        print(f"skipped {len(bad)}: " + "; ".join(f"{k} ({v})" for k, v in list(bad.items())[:5]))
    say(f"cache: {a.out}")
    return 0


def fit_basis(teacher: Teacher, plans: list[Plan], layers: list[int], s_grid: int, k: int, batch_size: int):
    """PCA of each layer's states over the aligned units of the first samples (an extra teacher pass)."""
    from tqdm import tqdm

    from bonsai_mlx.core.teacher_cache import PcaFit

    fits = {L: PcaFit(teacher.config.text_config.hidden_size) for L in layers}
    for i in tqdm(range(0, len(plans), batch_size), desc="fitting PCA", unit="batch"):
        for e in teacher_targets(teacher, plans[i : i + batch_size], layers, s_grid, {}).values():
            for L in layers:
                fits[L].add(e.text[L])
                if L in e.image:
                    fits[L].add(e.image[L])
    basis = {}
    for L in layers:
        mean, comps, kept = fits[L].finish(k)
        basis[L] = (mean, comps)
        print(f"PCA layer {L}: {k} components keep {kept:.1%} of the variance")
    return basis


if __name__ == "__main__":
    sys.exit(main())
