"""Writes the bundled synthetic test model, model_repository/synthetic_colour_classes.

It is not trained: it labels pixels by dominant colour (see tests.harness.synthetic_models),
so the service can be tried end to end before any trained model is in the repository.
"""

from pathlib import Path

from tests.harness.synthetic_models import write_entry

if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent / "model_repository"
    write_entry(
        root,
        "synthetic_colour_classes",
        360,
        480,
        max_batch_size=8,
        max_queue_delay_us=0,
        max_queue_size=64,
    )
    print(f"wrote {root / 'synthetic_colour_classes'}")
