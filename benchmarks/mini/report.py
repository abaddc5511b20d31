"""The report stage of a mini benchmark: every finished row read back from the work folder (its
grid, selected rate, per-seed values and {mean, std}), the token entropy and empty share of the
generations the harness saved, and the JSON, markdown and PNG files in --out."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import statistics
import subprocess
from pathlib import Path

from asu_simu_plugin.diagnostics import token_entropy

from .markdown import markdown
from .plots import plot_equal_forgetting
from .rules import SELECTION_RULE, aggregate, equal_forgetting, selection_keys

TEACHER_KEYS = ("temperature", "layers", "layers_label")  # of an ASU row's forget-teacher


def read_json(path):
    return json.loads(Path(path).read_text())


def pick(record, *keys):
    return {k: record.get(k) for k in keys}


def kind_of(name, ours):
    if name in ("retain", "target"):
        return "reference"
    return "ours" if name in ours else "harness"


def mean_token_entropy(tokenizer, texts):
    """The mean over generated texts of `token_entropy` of each text's token ids (encoded without
    special tokens); 0 for no texts."""
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    return sum(token_entropy(i) for i in ids) / max(len(texts), 1)


def busy_seconds(markers):
    """Seconds during which at least one stage ran (the union of the stage markers' intervals):
    rows run by parallel invocations on one work folder overlap and are not counted twice."""
    spans = sorted(
        (end - info["seconds"], end)
        for info in markers
        for end in [dt.datetime.fromisoformat(info["finished"]).timestamp()]
    )
    total, reach = 0.0, float("-inf")
    for start, end in spans:
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def versions(harness):
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "datasets", "accelerate", "asu-simu-plugin"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(harness), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    out["open-unlearning checkout"] = commit
    return out


class Report:
    """The report stage of a `Pipeline` (a mixin: it reads the plan, `runs_of`, `selected`,
    `seed_runs`, `summary`, and the work folder). A benchmark provides `generations`, `title`,
    `plot` and, where it states one, `goal`."""

    grid_extra = ()  # summary keys the learning-rate grid's table adds to the selection's

    def generations(self, name):
        """(first input, the generations the report measures) of one evaluation."""
        raise NotImplementedError

    def metrics(self, name, tokenizer):
        summary = self.summary(name)
        question, generations = self.generations(name)
        out = {key: summary.get(key) for _, key, _ in self.columns}
        out[self.matching_key[0]] = summary.get(self.matching_key[0])
        out["token_entropy"] = mean_token_entropy(tokenizer, generations)
        out["empty_share"] = sum(not g.strip() for g in generations) / len(generations)
        out["sample_generation"] = {"question": question, "generation": generations[0]}
        return out

    def done(self, run):
        return self.marker(f"eval_{run.name}").exists()

    def report_row(self, row, tokenizer):
        """One row: its grid (first seed), the selected rate, per-seed values and {mean, std}."""
        base, overrides = self.args.variants.get(row, (row, []))
        out = {"name": row, "kind": kind_of(base, self.ours)}
        if row in self.args.variants:
            out["variant_of"], out["overrides"] = base, overrides
        grid = self.runs_of(row)
        if not all(self.done(r) for r in grid):
            return None
        lr, why = self.selected(row)
        out["learning_rate"], out["selection"] = lr, why
        curve = [r for r in self.curve_runs(row) if self.done(r)]
        runs = [r for r in self.seed_runs(row) if self.done(r)]
        # each run scored once: the selected rate's first seed is both a grid point and a seed
        metrics = {r: self.metrics(r.name, tokenizer) for r in {*grid, *curve, *runs}}
        samples = {r: metrics[r].pop("sample_generation") for r in metrics}
        out["lr_grid"] = [
            {"learning_rate": r.lr, "in_grid": r in grid, "selected": r.lr == lr, **metrics[r]}
            for r in sorted([*grid, *curve], key=lambda r: r.lr)
        ]
        per_seed = [{"seed": r.seed, **metrics[r]} for r in runs]
        out["sample_generation"] = samples[runs[0]]
        out.update(aggregate(per_seed))
        out["unlearn_seconds"] = statistics.mean(
            read_json(self.marker(f"unlearn_{r.name}"))["seconds"] for r in runs
        )
        chosen = [self.work / "unlearn" / r.name / "asu_temperature.json" for r in runs]
        if all(path.is_file() for path in chosen):
            out["asu_auto"] = [
                {"seed": r.seed, **pick(read_json(path), "temperature", "layers_label", "reason")}
                for r, path in zip(runs, chosen, strict=True)
            ]
        return out

    def reference_row(self, name, tokenizer):
        metrics = self.metrics(name, tokenizer)
        row = {
            "name": name,
            "kind": "reference",
            "sample_generation": metrics.pop("sample_generation"),
        }
        return {**row, **aggregate([{"seed": self.args.seeds[0], **metrics}])}

    def teacher_row(self, row, tokenizer):
        """ASU row `row`'s forget-teacher (the target, tempered), scored like the models."""
        setting = pick(read_json(self.marker(f"eval_teacher_{row}")), *TEACHER_KEYS)
        out = self.reference_row(f"teacher_{row}", tokenizer)
        return {**out, "name": f"{row} teacher", "kind": "teacher", "teacher_of": row, **setting}

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.base_model)

    def identity(self):
        """The report's name, date, machine and package versions."""
        from asu_simu_plugin.diagnostics import machine_info

        a = self.args
        return {
            "name": a.name,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": {**machine_info(), "device": a.device},
            "versions": versions(a.harness),
        }

    def timing(self):
        """Each finished stage's seconds (in the order they finished) and the run time."""
        markers = {p.stem: read_json(p) for p in (self.work / "stages").glob("*.json")}
        order = sorted(markers, key=lambda stage: markers[stage]["finished"])
        return {
            "stage_seconds": {stage: markers[stage]["seconds"] for stage in order},
            "total_seconds": round(busy_seconds(markers.values()), 1),
        }

    def report(self):
        """The md/json/PNG report of every finished row (a row appears once its grid is done)."""
        a = self.args
        tokenizer = self.tokenizer()
        rows = [self.reference_row(name, tokenizer) for name in ("retain", "target")]
        for name in a.rows:
            row = self.report_row(name, tokenizer)
            rows += [row] if row else []
            if self.marker(f"eval_teacher_{name}").exists():
                rows.append(self.teacher_row(name, tokenizer))
        by_name = {row["name"]: row for row in rows}
        comparisons = [
            equal_forgetting(by_name[x], by_name[y], self.matching_key[0], self.selection[0])
            for x, y in self.equal_forgetting
            if x in by_name and y in by_name
        ]
        result = {
            **self.identity(),
            "settings": self.settings(),
            "rows": rows,
            "equal_forgetting": comparisons,
            "goal": self.goal(by_name),
            **self.timing(),
        }
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{a.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        self.plot(rows, a.out / f"{a.name}.png")
        if comparisons:
            plot_equal_forgetting(
                rows, comparisons, a.out / f"{a.name}_equal_forgetting.png", self.matching_key
            )
        for row in rows:
            if row.get("asu_auto"):  # the sweep behind the first seed's choice, beside the report
                run = self.seed_runs(row["name"])[0]
                for ext in ("csv", "png"):
                    sweep = self.work / "unlearn" / run.name / f"asu_tau_sweep.{ext}"
                    shutil.copyfile(sweep, a.out / f"{a.name}_{row['name']}_tau_sweep.{ext}")
        text = self.markdown(result)
        (a.out / f"{a.name}.md").write_text(text)
        print(text, flush=True)
        return {"report": str(a.out / f"{a.name}.md")}

    def settings(self):
        """What the report states the run was (the JSON's `settings`)."""
        a = self.args
        utility, forget, sign, best = selection_keys(self.selection)
        return {
            "data_rows": {
                k: v for k, v in read_json(self.marker("data")).items() if isinstance(v, int)
            },
            "finetune": {"epochs": a.finetune_epochs, "learning_rate": a.finetune_lr},
            "unlearn": {"epochs": a.unlearn_epochs, "learning_rates": a.rates},
            "selection": {
                "keys": [utility, forget],
                "forget_better": "higher" if sign > 0 else "lower",
                "utility_floor": a.utility_floor,
                "rule": SELECTION_RULE.format(
                    utility=utility, forget=forget, best=best, floor=a.utility_floor
                ),
            },
            "seeds": a.seeds,
            "headline": a.headline,
            "variants": a.variants,
            "per_device_batch_size": a.batch_size,
            "gradient_accumulation_steps": a.grad_accum,
            "rouge_max_new_tokens": a.max_new_tokens,
            "simu_ig_steps": a.simu_ig_steps,
            "max_steps": a.max_steps,
        }

    def goal(self, rows):
        """A method's stated target on this benchmark, checked on the seed means; None: none."""
        return None

    def markdown(self, result):
        return markdown(
            result,
            self.columns,
            self.matching_key,
            self.title(result),
            notes=self.notes(result),
            script=self.script,
            grid_extra=self.grid_extra,
        )

    def notes(self, result):
        """Extra paragraphs of the report, between the settings and the table."""
        return []

    def title(self, result):
        raise NotImplementedError

    def plot(self, rows, path):
        """The utility-vs-forgetting figure of the report's rows (`plots.plot_rows`)."""
        raise NotImplementedError
