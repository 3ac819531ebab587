"""The embedding model on ONNX Runtime: exported once from the local weights, then cached.

The export wraps the transformer with the model's own pooling (mask-aware mean, then L2
normalisation, as all-MiniLM-L6-v2's sentence-transformers modules do), so one ``run`` gives the
final vectors. ONNX Runtime's transformer optimizer then fuses attention, layer norm and GELU;
``quantize=True`` adds dynamic int8 quantisation of the weights on top of that graph.

The files live in ``RAG_DATA_DIR/models`` under a key of the weights' name, size and mtime, and
are written to a temporary name and renamed, so concurrent processes never read half a file.
Nothing is downloaded: the export reads the model folder only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

log = logging.getLogger(__name__)

EXPORT_VERSION = 2  # bump when the exported graph changes


def _weights(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin")


def _key(folder: Path) -> str:
    w = _weights(folder)
    st = w.stat()
    raw = f"{EXPORT_VERSION}:{folder.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"{folder.name}-{hashlib.sha1(raw.encode()).hexdigest()[:12]}"


def _atomic(target: Path, write: Any) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """The one-time export without the libraries' chatter on the terminal: transformers'
    "Loading weights" bar, and ONNX Runtime's quantizer advice ("consider pre-processing"),
    which it logs on the root logger — and ``logging.warning`` then gives a process with no
    logging set up (the ingest CLI) a root handler of its own. Errors still show."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    root = logging.getLogger()
    only_errors = _ErrorsOnly()
    keep = logging.NullHandler()  # a handler already there: logging.warning adds none
    root.addFilter(only_errors)
    root.addHandler(keep)
    try:
        yield
    finally:
        root.removeHandler(keep)
        root.removeFilter(only_errors)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def export(folder: Path, target: Path) -> None:
    """The model folder's transformer + mean pooling + normalisation, as an optimised ONNX graph."""
    import torch
    from transformers import AutoModel

    config = json.loads((folder / "config.json").read_text())
    bert = AutoModel.from_pretrained(
        str(folder), local_files_only=True, attn_implementation="eager"
    ).eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            h = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    ids = torch.ones((2, 8), dtype=torch.int64)
    axes = {0: "batch", 1: "seq"}

    def write_raw(path: Path) -> None:
        # tracing warns about shape-dependent branches in the mask code: with the attention mask
        # as long as the input (always, here) they take the same path for every shape
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Pooled(),
                (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                str(path),
                input_names=["input_ids", "attention_mask", "token_type_ids"],
                output_names=["embedding"],
                dynamic_axes={
                    "input_ids": axes,
                    "attention_mask": axes,
                    "token_type_ids": axes,
                    "embedding": {0: "batch"},
                },
                opset_version=17,
                dynamo=False,
            )

    def write_optimised(path: Path) -> None:
        from onnxruntime.transformers import optimizer

        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.onnx"
            write_raw(raw)
            model = optimizer.optimize_model(
                str(raw),
                model_type="bert",
                num_heads=int(config["num_attention_heads"]),
                hidden_size=int(config["hidden_size"]),
            )
            model.save_model_to_file(str(path))

    _atomic(target, write_optimised)


def quantize_int8(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # per-channel scales keep the vectors within ~0.995 cosine of fp32 (per-tensor: ~0.935);
    # the fused graph has contrib ops that shape inference cannot type: their outputs are float
    _atomic(
        target,
        lambda p: quantize_dynamic(
            str(source),
            str(p),
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        ),
    )


class OnnxEncoder:
    def __init__(self, session: Any, tokenizer: Any, max_tokens: int) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._dimension: int | None = None

    @classmethod
    def load(
        cls,
        folder: Path,
        cache_dir: Path,
        max_tokens: int,
        quantize: bool,
        threads: int | None = None,
    ) -> OnnxEncoder:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        key = _key(folder)
        fp32 = cache_dir / f"{key}.onnx"
        if not fp32.is_file():
            log.info("exporting %s to ONNX (once): %s", folder.name, fp32)
            with _quietly():
                export(folder, fp32)
        path = fp32
        if quantize:
            path = cache_dir / f"{key}.int8.onnx"
            if not path.is_file():
                log.info("quantising %s to int8 (once): %s", fp32.name, path)
                with _quietly():
                    quantize_int8(fp32, path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # idle intra-op threads sleep instead of spinning: a spinning pool after every query
        # took CPU from the event loop relaying hundreds of answers on the same two cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(max_length=max_tokens)
        return cls(session, tok, max_tokens)

    def encode(self, texts: list[str], batch_size: int) -> npt.NDArray[np.float32]:
        return self.encode_ids([e.ids for e in self.tokenizer.encode_batch(texts)], batch_size)

    def encode_ids(
        self, token_ids: Sequence[Sequence[int]], batch_size: int
    ) -> npt.NDArray[np.float32]:
        """Vectors for texts already tokenised (special tokens included; cut to the window
        here as the tokenizer would)."""
        import numpy as np

        seqs = [list(ids[: self.max_tokens]) for ids in token_ids]
        if any(len(ids) > self.max_tokens for ids in token_ids):
            # truncation as the tokenizer does it: the closing special token stays last
            seqs = [
                s if len(ids) <= self.max_tokens else [*s[:-1], ids[-1]]
                for s, ids in zip(seqs, token_ids, strict=True)
            ]
        # longest first, so each batch pads to a similar length (as sentence-transformers does)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out = np.zeros((len(seqs), self.dimension), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(seqs[i]) for i in idx)
            ids = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                n = len(seqs[i])
                ids[row, :n] = seqs[i]
                mask[row, :n] = 1
            types = np.zeros_like(ids)
            (vecs,) = self.session.run(
                None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            )
            out[idx] = vecs
        return out

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            dim = self.session.get_outputs()[0].shape[-1]
            if not isinstance(dim, int):
                dim = int(self.session.run(None, self._probe())[0].shape[-1])
            self._dimension = dim
        return self._dimension

    def _probe(self) -> dict[str, Any]:
        import numpy as np

        one = np.ones((1, 2), dtype=np.int64)
        return {"input_ids": one, "attention_mask": one, "token_type_ids": np.zeros_like(one)}
