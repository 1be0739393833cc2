"""Pico on llama.cpp (through llama-cpp-python): the model side of the llama.cpp engine.

The model directory is taken as it is: its GGUF pair is made on first use and cached (engines.gguf_cache).
Everything around the two networks is the project's own code, shared with the MLX engine: the checkpoint's
tokenizer and chat template (core.processing.Processor) give the token ids, so both engines read the same
prompt, and the conversation logic (turns, literal user text, image slots, reuse of the cached prefix, partial
answers kept, context fitting) is ChatSession's: `bonsai_mlx.generate.LlamaChatSession` runs its turns on a
LlamaModel from here (this module never imports generate: generate's CLI imports the engines). llama.cpp runs the
vision tower + projector (its `mtmd` library, on the mmproj GGUF) and the language model; sampling happens on its
logits here (`make_picker`), as in the MLX engine (<image> is never sampled; temperature and top-p as mlx-lm's).

Images are stretched to the model's square input size here, the way Pico's image processor resizes them,
before llama.cpp sees them: llama.cpp would pad a non-square image to a square (llava-1.5 style), and then
read other pixels than Pico.

One llama.cpp context holds the KV cache of one conversation at a time. When another session takes the model,
the previous owner's cache is copied out (`llama_state_seq_get_data`, ~12 KB per token at full size) and put
back when that session speaks again, so a follow-up prefills only its new turn, as with MLX.
"""

from __future__ import annotations

import ctypes
import os
import sys
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bonsai_mlx.core.errors import UserError
from bonsai_mlx.engines import gguf_cache

N_CTX = 4096  # tokens the context holds (KV cache ~12 KB/token for the full-size Pico at f16)
N_BATCH = 512


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _require():
    try:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd
    except ImportError as e:
        raise UserError(
            "the llama.cpp engine needs llama-cpp-python: pip install -e '.[llama]' "
            f"(it compiles llama.cpp, a few minutes) ({e})"
        ) from None
    return llama_cpp, mtmd


_LOG_CB = None


def _quiet(llama_cpp, mtmd) -> None:
    """llama.cpp and its clip loader log every tensor to stderr; keep them silent unless BONSAI_DEBUG is set."""
    global _LOG_CB
    if _LOG_CB is not None or os.environ.get("BONSAI_DEBUG"):
        return
    _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
    for name in ("mtmd_log_set", "mtmd_helper_log_set"):
        fn = getattr(mtmd, name, None)
        if fn is not None:
            fn(_LOG_CB, ctypes.c_void_p(0))


def default_gguf_type() -> str:
    """q4_0 where llama.cpp computes on the CPU (decode is memory-bound: fewest bytes per token), f16 with a GPU."""
    try:
        import llama_cpp

        return "f16" if llama_cpp.llama_supports_gpu_offload() else "q4_0"
    except ImportError:
        return "q4_0"


def peak_rss_gb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1e9 if sys.platform == "darwin" else r * 1024 / 1e9


AMX_NOTE = (
    "llama-cpp-python was built with AMX (GGML_NATIVE on an AMX CPU), whose kernels crash in llama.cpp "
    "(ggml-org/llama.cpp#20824): running without AMX and the CPU weight repacking, slower; rebuild without AMX "
    "(docs/engines.md)"
)


def amx_build(llama_cpp) -> bool:
    """True when this llama.cpp was compiled with AMX kernels. Their mul_mat segfaults on the first matmul on
    Sapphire-Rapids-class CPUs (seen here on every Pico, tiny and full size; ggml-org/llama.cpp#20824), and the
    only runtime switch that avoids them, `use_extra_bufts=False`, also turns off the AVX2/AVX512 repacking of
    q4_0/q8_0 weights. scripts/setup.sh builds without AMX on such CPUs."""
    try:
        info = llama_cpp.llama_print_system_info().decode()
    except Exception:
        return False
    return "AMX_INT8 = 1" in info


# -- pixels -------------------------------------------------------------------------------------------------------
def stretch_size(proc) -> tuple[tuple[int, int], int] | None:
    """((width, height), PIL resample) the image processor resizes every image to, or None if it keeps sizes."""
    ip = proc.image_processor
    size = getattr(ip, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    w, h = get("width"), get("height")
    if not (w and h and getattr(ip, "do_resize", True)):
        return None
    resample = getattr(ip, "resample", None)
    return (int(w), int(h)), int(resample if resample is not None else 3)


def pico_pixels(proc, image) -> np.ndarray:
    """(H, W, 3) uint8: the pixels Pico's processor reads, before rescaling and normalising.

    Paths, bytes and PIL images are loaded (EXIF, mode) as the processor loads them and stretched to its square
    input size with its own resample filter. A (3, H, W) float array is the processor's output for one image
    (the server keeps images that way); it is mapped back through the processor's mean, std and rescale factor,
    which recovers the uint8 pixels exactly (the float error is far below half a grey level)."""
    from PIL import Image

    from bonsai_mlx.core.images import load_image

    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[0] == 3 and image.dtype != np.uint8:
            ip = proc.image_processor
            a = np.asarray(image, dtype=np.float64).transpose(1, 2, 0)
            if getattr(ip, "do_normalize", True):
                a = a * np.asarray(ip.image_std, dtype=np.float64) + np.asarray(ip.image_mean, dtype=np.float64)
            if getattr(ip, "do_rescale", True):
                a = a / float(ip.rescale_factor)
            return np.clip(np.rint(a), 0, 255).astype(np.uint8)
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    im = load_image(image)
    target = stretch_size(proc)
    if target is not None and im.size != target[0]:
        im = im.resize(target[0], resample=target[1])
    return np.asarray(im, dtype=np.uint8)


# -- the model ----------------------------------------------------------------------------------------------------
@dataclass
class LlamaOptions:
    gguf_type: str | None = None  # None: default_gguf_type()
    n_ctx: int = N_CTX
    threads: int | None = None  # None: every core


class LlamaModel:
    """The GGUF pair of one Pico loaded in llama.cpp: the LM context and the mtmd (vision) context.

    `config` is the Pico's own config with `text.max_position_embeddings` capped to the context size, so the
    session's and the server's context checks hold for this engine as they are."""

    engine = "llama.cpp"

    def __init__(self, model_dir: str | Path, options: LlamaOptions | None = None, log=None):
        from bonsai_mlx.core.config import PicoConfig
        from bonsai_mlx.core.hub import resolve

        o = options or LlamaOptions()
        llama_cpp, mtmd = _require()
        _quiet(llama_cpp, mtmd)
        self.dir = resolve(model_dir)
        pico = PicoConfig.load(self.dir)
        self.kind = o.gguf_type or default_gguf_type()
        self.files = gguf_cache.ensure(self.dir, self.kind, log=log)
        n_ctx = max(64, min(o.n_ctx, pico.text.max_position_embeddings))
        self.config = replace(pico, text=replace(pico.text, max_position_embeddings=n_ctx))
        self.threads = o.threads or os.cpu_count() or 1
        self._ll, self._mtmd = llama_cpp, mtmd
        self._model = self._ctx = self._vision = None
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        # read the file into memory instead of mapping it: the CPU backend repacks q4_0/q8_0 weights into its own
        # buffer, and a mapped file would stay resident beside that copy (265 MB twice for the full-size q4_0 LM)
        mp.load_mode = getattr(llama_cpp, "LLAMA_LOAD_MODE_NONE", 0)
        if amx_build(llama_cpp):
            mp.use_extra_bufts = False  # see amx_build: no AMX (nor the CPU repack) rather than a crash
            if log:
                log(AMX_NOTE)
        self._model = llama_cpp.llama_model_load_from_file(str(self.files.lm).encode(), mp)
        if not self._model:
            raise UserError(f"{self.files.lm}: llama.cpp could not load it (set BONSAI_DEBUG=1 for its log)")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, N_BATCH, N_BATCH
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.no_perf = True
        # only the last position's logits are ever read: a compute buffer sized for n_batch rows of logits would
        # hold 512 x vocab floats (300 MB at the full-size vocabulary) for nothing
        cp.n_outputs_max = 1
        self._ctx = llama_cpp.llama_init_from_model(self._model, cp)
        if not self._ctx:
            self.close()
            raise UserError(f"{self.files.lm}: llama.cpp could not make a context of {n_ctx} tokens")
        vp = mtmd.mtmd_context_params_default()
        vp.n_threads, vp.print_timings = self.threads, False
        vp.use_gpu = bool(llama_cpp.llama_supports_gpu_offload())
        self._vision = mtmd.mtmd_init_from_file(str(self.files.mmproj).encode(), self._model, vp)
        if not self._vision:
            self.close()
            raise UserError(f"{self.files.mmproj}: llama.cpp's vision loader could not open it")
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        if self.n_vocab != pico.text.vocab_size:
            self.close()
            raise UserError(f"{self.files.lm}: {self.n_vocab} tokens, the model's config says {pico.text.vocab_size}")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self._owner: weakref.ref | None = None
        self.name = self.dir.name

    @property
    def describe(self) -> str:
        return f"llama.cpp {self.kind} ({self.files.lm.name} + {self.files.mmproj.name}, {self.threads} threads)"

    def close(self) -> None:
        ll, mt = self._ll, self._mtmd
        if getattr(self, "_batch", None) is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._vision:
            mt.mtmd_free(self._vision)
            self._vision = None
        if self._ctx:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            ll.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- the KV cache: one conversation at a time -------------------------------------------------------------
    def claim(self, session) -> None:
        """Make the context hold `session`'s tokens: the previous owner's KV is copied out, this one's put back."""
        cur = self._owner() if self._owner is not None else None
        if cur is session:
            return
        if cur is not None and cur.model is self and cur.cached_ids:
            cur.cache = self._save()
        else:
            self._forget(cur)
        self._ll.llama_memory_clear(self._mem, True)
        if isinstance(session.cache, bytes) and session.cached_ids:
            if not self._load(session.cache):
                session.cached_ids = []
        else:
            session.cached_ids = []
        session.cache = None
        self._owner = weakref.ref(session)

    def owns(self, session) -> bool:
        return self._owner is not None and self._owner() is session

    @staticmethod
    def _forget(session) -> None:
        if session is not None:
            session.cache, session.cached_ids = None, []

    def _save(self) -> bytes:
        n = self._ll.llama_state_seq_get_size(self._ctx, 0)
        buf = (ctypes.c_uint8 * n)()
        got = self._ll.llama_state_seq_get_data(self._ctx, buf, n, 0)
        return bytes(buf[:got])

    def _load(self, data: bytes) -> bool:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        ok = self._ll.llama_state_seq_set_data(self._ctx, buf, len(data), 0) == len(data)
        if not ok:
            self._ll.llama_memory_clear(self._mem, True)
        return ok

    def trim(self, n: int) -> None:
        """Forget every position from n on."""
        self._ll.llama_memory_seq_rm(self._mem, 0, n, -1)

    # -- computing ----------------------------------------------------------------------------------------------
    def _decode(self, tokens: list[int], pos: int) -> None:
        """Feed tokens at positions pos, pos+1, ...; logits of the last one only."""
        b = self._batch
        for start in range(0, len(tokens), N_BATCH):
            part = tokens[start : start + N_BATCH]
            for i, t in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos + start + i, 1, 0
                b.seq_id[i][0] = 0
            b.logits[len(part) - 1] = 1
            b.n_tokens = len(part)
            rc = self._ll.llama_decode(self._ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}) at position {pos + start}")

    def _image(self, pixels: np.ndarray, pos: int, expect: int) -> None:
        """Encode one image (H, W, 3 uint8, already at the model's size) and feed its embeddings at pos."""
        mt, ll = self._mtmd, self._ll
        h, w, _ = pixels.shape
        data = np.ascontiguousarray(pixels, dtype=np.uint8)
        bitmap = mt.mtmd_bitmap_init(w, h, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        if not bitmap:
            raise RuntimeError("mtmd_bitmap_init failed")
        chunks = mt.mtmd_input_chunks_init()
        try:
            text = mt.mtmd_input_text()
            marker = mt.mtmd_default_marker()
            text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
            bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = mt.mtmd_tokenize(self._vision, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise RuntimeError(f"mtmd_tokenize failed ({rc})")
            found = []
            for i in range(mt.mtmd_input_chunks_size(chunks)):
                chunk = mt.mtmd_input_chunks_get(chunks, i)
                kind, n = mt.mtmd_input_chunk_get_type(chunk), mt.mtmd_input_chunk_get_n_tokens(chunk)
                if kind == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    found.append(chunk)
                elif n:
                    raise RuntimeError("llama.cpp added text around the image; Pico's prompt has none")
            if len(found) != 1 or mt.mtmd_input_chunk_get_n_tokens(found[0]) != expect:
                got = [mt.mtmd_input_chunk_get_n_tokens(c) for c in found]
                raise UserError(f"{self.files.mmproj}: the image gives {got} tokens, the model reads {expect}")
            new_pos = ll.llama_pos(0)
            rc = mt.mtmd_helper_eval_chunk_single(
                self._vision, self._ctx, found[0], pos, 0, N_BATCH, False, ctypes.byref(new_pos)
            )
            if rc != 0:
                raise RuntimeError(f"llama.cpp failed to encode the image ({rc})")
        finally:
            mt.mtmd_input_chunks_free(chunks)
            mt.mtmd_bitmap_free(bitmap)

    def logits(self) -> np.ndarray:
        ptr = self._ll.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32)

    def prefill(self, ids: list[int], pos: int, images: list[np.ndarray], image_token: int, n_image: int):
        """Feed `ids` from position `pos`; each run of n_image image tokens takes the next of `images`."""
        i, k = 0, 0
        while i < len(ids):
            if ids[i] == image_token:
                if ids[i : i + n_image] != [image_token] * n_image or k >= len(images):
                    raise UserError("an image slot without its image (or a partial one) in the prompt")
                self._image(images[k], pos + i, n_image)
                i, k = i + n_image, k + 1
                continue
            j = i
            while j < len(ids) and ids[j] != image_token:
                j += 1
            self._decode(ids[i:j], pos + i)
            i = j
        if ids[-1] == image_token:  # the last logits come from text (a prompt always ends in the template's text)
            raise UserError("a prompt that ends in an image slot")
        return self.logits()

    def step(self, token: int, pos: int) -> np.ndarray:
        self._decode([token], pos)
        return self.logits()


# -- sampling -----------------------------------------------------------------------------------------------------
def make_picker(model: LlamaModel, proc, sampling):
    """Logits -> the next token, as the MLX engine's `_token_picker`: argmax at temperature 0, else top-p (the
    same cut as mlx-lm's apply_top_p) then a draw at the temperature; <image> never."""
    rng = np.random.default_rng(sampling.seed)
    image = proc.image_token_id

    def pick(logits: np.ndarray) -> int:
        """`logits` is the caller's own copy (LlamaModel.logits makes one); the greedy path masks it in place."""
        if sampling.temperature == 0:
            logits[image] = -np.inf
            return int(np.argmax(logits))
        logits = logits.astype(np.float64)
        logits[image] = -np.inf
        logprobs = logits - np.logaddexp.reduce(logits)
        if 0 < sampling.top_p < 1:
            order = np.argsort(-logprobs, kind="stable")
            probs = np.exp(logprobs[order])
            above = np.concatenate([[0.0], np.cumsum(probs)[:-1]])  # mass of the tokens ranked higher
            cut = order[above >= sampling.top_p]
            logprobs[cut] = -np.inf
        z = logprobs / sampling.temperature
        p = np.exp(z - np.max(z))
        return int(rng.choice(len(p), p=p / p.sum()))

    return pick


def _release_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them): building the fast tokenizer of a 151k vocabulary
    leaves ~160 MB of freed Python objects resident otherwise."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def load(model_dir: str | Path, options: LlamaOptions | None = None, log=None):
    """(LlamaModel, Processor) ready for bonsai_mlx.generate.LlamaChatSession. The processor comes first and its
    construction garbage is returned to the OS before the weights are read, so peak memory is the steady state,
    not the sum."""
    from bonsai_mlx.core.config import PicoConfig
    from bonsai_mlx.core.hub import resolve
    from bonsai_mlx.core.processing import Processor

    d = resolve(model_dir)
    proc = Processor(d, PicoConfig.load(d))
    _release_heap()
    model = LlamaModel(d, options, log=log)
    proc.config = model.config  # the same, with the context capped to what llama.cpp holds
    return model, proc
