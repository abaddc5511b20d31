"""`asu-simu demo`: the whole ASU story on a laptop CPU in about a minute, fully offline.

1. Invent twelve fictitious authors and their facts; train a BPE tokenizer and a tiny Llama on
   them until it knows every author (the "target", like TOFU's finetuned model). Every question
   is asked under a chat system prompt, as with chat models.
2. Unlearn one author with ASU (the standalone ASU trainer, ASU_GD variant): on that author's
   questions the model is distilled, token by token, towards the forget-teacher — the frozen
   target with its attention smoothed by the temperature τ — while retain NLL keeps the others.
3. Print, before and after: answer probability (the TOFU "Probability"), the probability of the
   fact tokens alone, how many greedy answers still state their fact — on the forgotten author
   and on the others — the teacher's values (what ASU distils towards), and the answers.

The toy setting (why these answers, this model shape, τ = 10) is explained in
`asu_simu_plugin.demo`, which holds the experiment; this command prints its table.
"""

from __future__ import annotations

from asu_simu_plugin.cli.checks import (
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from asu_simu_plugin.demo import DEFAULTS, run_demo


def print_table(result) -> None:
    """The before / teacher / after table and the answers of `demo.run_demo`'s result."""
    before, teacher, after = result["before"], result["teacher"], result["after"]
    settings, name = result["settings"], result["author"]
    width = 78
    print("\n" + "=" * width)
    print(
        f"ASU demo: unlearning '{name}' — tau={settings['temperature']:g} on all layers, "
        f"gamma={settings['gamma']:g}, retain NLL x{settings['alpha']:g}"
    )
    print("=" * width)
    print(f"{'':34}{'before':>10}{'teacher':>12}{'after ASU':>12}")

    def cells(key, fmt, models):
        return [fmt(m[key]) if m is not None else "" for m in models]

    def prob(m):
        return f"{m['prob']:.3f}"

    def fact_prob(m):
        return f"{m['fact_prob']:.3f}"

    def stated(m):
        return f"{m['facts_stated']}/{m['facts']}"

    forget = (before, teacher, after)
    retain = (before, None, after)
    for label, fmt, models in (
        ("forget: answer probability", prob, forget),
        ("forget: fact-token probability", fact_prob, forget),
        ("forget: facts in greedy answers", stated, forget),
        ("retain: answer probability", prob, retain),
        ("retain: fact-token probability", fact_prob, retain),
        ("retain: facts in greedy answers", stated, retain),
    ):
        key = "forget" if label.startswith("forget") else "retain"
        row = cells(key, fmt, models)
        print(f"{label:34}{row[0]:>10}{row[1]:>12}{row[2]:>12}")
    print(
        f"teacher: the target with its attention smoothed (tau={settings['temperature']:g}), "
        "run on the\nforget questions only — what ASU distils the forget answers towards. "
        "Answer\nprobability is TOFU's exp(-mean answer-token NLL); fact tokens are the answer\n"
        "tokens that spell the fact (the `asu-simu tau-sweep` content tokens)."
    )
    print("-" * width)
    print("forgotten author:")
    for question, old, new in zip(
        result["forget_questions"],
        before["forget"]["answers"],
        after["forget"]["answers"],
        strict=True,
    ):
        print(f"  {question}\n    before: {old}\n    after : {new}")
    print("two of the other authors:")
    retain_questions = result["retain_questions"]
    for index in (0, len(retain_questions) // 2 + 1):
        print(f"  {retain_questions[index]}")
        print(f"    before: {before['retain']['answers'][index]}")
        print(f"    after : {after['retain']['answers'][index]}")
    print("-" * width)
    print(f"unlearned model saved to {result['output_dir']}/ ({result['seconds']:.0f} s in all)")


def add_arguments(parser) -> None:
    parser.add_argument("--output", default="asu_demo", help="where the unlearned model goes")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty --output"
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="a different world of authors"
    )
    parser.add_argument(
        "--temperature", type=positive_float, default=DEFAULTS["temperature"], help="ASU's tau"
    )
    parser.add_argument(
        "--gamma",
        type=non_negative_float,
        default=DEFAULTS["gamma"],
        help="forget (distillation) weight",
    )
    parser.add_argument(
        "--alpha", type=non_negative_float, default=DEFAULTS["alpha"], help="retain (NLL) weight"
    )
    parser.add_argument(
        "--unlearn-epochs",
        type=positive_float,
        default=DEFAULTS["unlearn_epochs"],
        help="ASU epochs",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=positive_int,
        default=DEFAULTS["finetune_epochs"],
        help="epochs that teach the tiny model its authors first",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    result = run_demo(
        args.output,
        seed=args.seed,
        progress=not args.quiet,
        overwrite=args.overwrite,
        say=print,
        temperature=args.temperature,
        gamma=args.gamma,
        alpha=args.alpha,
        unlearn_epochs=args.unlearn_epochs,
        finetune_epochs=args.finetune_epochs,
    )
    print_table(result)
    return 0
