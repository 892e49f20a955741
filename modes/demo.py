"""`--mode demo`: train the tiny model on the generated dataset, then evaluate it untrained and trained."""

from __future__ import annotations

from pathlib import Path

DEMO_PICTURE_QUERIES = 8


def run_from_arguments(config, arguments) -> None:
    run_demo(config)


def run_demo(config) -> dict:
    from evaluation import markdown_table, write_report
    from modes.evaluate import run_eval
    from modes.train import run_train

    run_train(config, resume=False, overwrite=True)
    untrained = run_eval(config, "none", None, visualize=DEMO_PICTURE_QUERIES)
    trained = run_eval(config, None, None, visualize=DEMO_PICTURE_QUERIES)
    table = markdown_table({"untrained (random init)": untrained, "trained (best.pt)": trained})
    summary = {"untrained": untrained, "trained": trained,
               "recall@1_gain_points": round(100 * (trained["recall@1"] - untrained["recall@1"]), 2)}
    write_report(summary, Path(config.output.dir) / "demo_report.json")
    print("\nDemo, test split (classes never seen in training):\n")
    print(table)
    print(f"\nRecall@1 gain from training: {summary['recall@1_gain_points']:+.2f} points")
    return summary
