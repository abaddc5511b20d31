"""The ASU paper's measures as open-unlearning metric functions (`fn(model, **kwargs)` returning
`{"agg_value", "value_by_index"}`). `asu_simu_plugin.harness` wraps them into the harness's metric
objects; nothing here imports the harness.

They read what the harness's own metrics computed, as pre-computes:
- `paper_truth_ratio`: two `probability` results, `correct` (paraphrased or true answer) and
  `wrong` (perturbed answers), whose per-row `avg_loss` is the NLL per answer token;
- `token_entropy`, `cosine_similarity`, `entailment_score`: one `rouge` result, `generations`,
  whose rows hold the greedy answer (`generation`), the decoded reference (`ground_truth`) and
  its `rougeL_recall`;
- `paper_hmean`: any metrics; the harmonic mean of their values (Model Utility, Forget Efficacy).

A scorer metric whose model is set to null (`nli_model` / `embedding_model`) is left out: it
returns `agg_value: None` with the reason, and `paper_hmean` records it under `left_out`.
"""

from __future__ import annotations

import math

from asu_simu_plugin.metrics import formulas, scorers


def _rows(kwargs, access_key: str) -> dict:
    try:
        return kwargs["pre_compute"][access_key]["value_by_index"]
    except (KeyError, TypeError):
        raise ValueError(
            f"this metric needs a pre_compute entry with access_key: {access_key}"
        ) from None


def _usable(entry, key) -> bool:
    value = entry.get(key) if entry else None
    if isinstance(value, list):
        return bool(value) and all(v is not None and not math.isnan(v) for v in value)
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _summary(value_by_index: dict, key: str) -> dict:
    values = [entry[key] for entry in value_by_index.values()]
    return {"agg_value": formulas.mean(values), "value_by_index": value_by_index}


def _left_out(reason: str) -> dict:
    return {"agg_value": None, "left_out": reason}


def _device(model, kwargs):
    return kwargs.get("device") or getattr(model, "device", None) or "cpu"


def _references(kwargs, generations: dict) -> tuple[dict, str]:
    """The reference each answer is scored against, and where it came from: the first of the
    data row keys `reference_key` names that the rows have (e.g. [original_answer, answer]:
    the hub's TOFU real_authors / world_facts have no original_answer), else (null) the
    reference the ROUGE metric decoded."""
    keys = kwargs.get("reference_key")
    if keys is None:
        return {idx: entry["ground_truth"] for idx, entry in generations.items()}, "ground_truth"
    keys = [keys] if isinstance(keys, str) else list(keys)
    rows = getattr(kwargs.get("data"), "data", None)
    if rows is None:
        raise ValueError(f"reference_key={keys} needs `datasets` (one QA dataset) in the metric")
    present = [k for k in keys if k in rows.column_names]
    if not present:
        raise ValueError(f"the data has none of {keys} (its columns: {rows.column_names})")
    return {idx: rows[int(idx)][present[0]] for idx in generations}, present[0]


def truth_ratio(model, **kwargs):
    """The official truth ratio of a split (`formulas.truth_ratio`); `forget: true` on the
    forget split. Per row: r = exp(mean perturbed NLL − correct NLL)."""
    correct, wrong = _rows(kwargs, "correct"), _rows(kwargs, "wrong")
    by_index = {}
    for idx, entry in correct.items():
        if _usable(entry, "avg_loss") and _usable(wrong.get(idx), "avg_loss"):
            ratio = formulas.perturbation_ratio(entry["avg_loss"], wrong[idx]["avg_loss"])
            by_index[idx] = {"ratio": ratio}
    value = formulas.truth_ratio((e["ratio"] for e in by_index.values()), bool(kwargs["forget"]))
    return {"agg_value": value, "value_by_index": by_index}


def token_entropy(model, **kwargs):
    """Mean normalised unigram entropy of the answers' tokens (the model's tokenizer)."""
    tokenizer = kwargs["tokenizer"]
    by_index = {
        idx: {"token_entropy": formulas.token_entropy(tokenizer.tokenize(entry["generation"]))}
        for idx, entry in _rows(kwargs, "generations").items()
    }
    return _summary(by_index, "token_entropy")


def cosine_similarity(model, **kwargs):
    """Mean max(0, cos) between the sentence embeddings of each answer and its reference."""
    path = kwargs.get("embedding_model")
    if path is None:
        return _left_out("embedding_model is null")
    generations = _rows(kwargs, "generations")
    references, reference = _references(kwargs, generations)
    indices = list(generations)
    device = _device(model, kwargs)
    answers = scorers.embeddings(path, [generations[i]["generation"] for i in indices], device)
    targets = scorers.embeddings(path, [references[i] for i in indices], device)
    by_index = {
        idx: {"cosine_similarity": formulas.clipped_cosine(a.tolist(), b.tolist())}
        for idx, a, b in zip(indices, answers, targets, strict=True)
    }
    return {**_summary(by_index, "cosine_similarity"), "reference": reference}


DIRECTIONS = ("answer_to_reference", "reference_to_answer")


def entailment_score(model, **kwargs):
    """Share of answers the NLI model labels entailment; `direction` says which text is the
    premise (answer_to_reference: the answer entails the reference). Answers with ROUGE-L
    recall below `rouge_floor` (0.1, the official value) count as not entailed without asking
    the model."""
    path = kwargs.get("nli_model")
    if path is None:
        return _left_out("nli_model is null")
    direction = kwargs.get("direction")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)} (got {direction!r})")
    label_name = kwargs.get("entailment_label", formulas.ENTAILMENT)
    generations = _rows(kwargs, "generations")
    references, reference = _references(kwargs, generations)
    floor = kwargs.get("rouge_floor", formulas.ROUGE_FLOOR)
    asked = [i for i, e in generations.items() if e["rougeL_recall"] >= floor]
    answers = [generations[i]["generation"] for i in asked]
    targets = [references[i] for i in asked]
    pairs = (answers, targets) if direction == "answer_to_reference" else (targets, answers)
    batch_size = kwargs.get("nli_batch_size", 30)
    labels = dict(
        zip(
            asked, scorers.nli_labels(path, *pairs, _device(model, kwargs), batch_size), strict=True
        )
    )
    by_index = {}
    for idx, entry in generations.items():
        label = labels.get(idx, "none")  # "none": below the ROUGE floor, as the official code
        hit = formulas.entailed(label, entry["rougeL_recall"], label_name, floor)
        by_index[idx] = {"label": label, "entailed": float(hit)}
    return {**_summary(by_index, "entailed"), "reference": reference}


def hmean(model, **kwargs):
    """Harmonic mean of the pre-computed metrics' values; those named in `complement` enter as
    1 − value. Metrics without a value (a scorer set to null) are left out and listed."""
    results = kwargs.get("pre_compute") or {}
    complement = set(kwargs.get("complement") or [])
    unknown = sorted(complement - set(results))
    if unknown:
        raise ValueError(f"complement names {unknown}, which are not pre-computed here")
    terms, left_out = {}, []
    for name, result in results.items():
        value = (result or {}).get("agg_value")
        if value is None:
            left_out.append(name)
            continue
        terms[name] = 1.0 - float(value) if name in complement else float(value)
    return {
        "agg_value": formulas.harmonic_mean(terms.values()),
        "terms": terms,
        "left_out": left_out,
    }
