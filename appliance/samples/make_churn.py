"""Regenerate churn.csv: a subscription-churn table with the structure of real telecom churn data.

Simulated (no download, no third-party licence): tenure, plan, charges, usage and support
history drive a logistic churn hazard with interactions and label noise, so the problem is
learnable but not trivial. Run `python -m appliance.samples.make_churn` to rewrite the file;
the seed keeps it byte-identical.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

ROWS = 5000
SEED = 20261126


def generate(rows: int = ROWS, seed: int = SEED) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    contract = rng.choice(["month-to-month", "one-year", "two-year"], rows, p=[0.55, 0.25, 0.2])
    internet = rng.choice(["dsl", "fiber", "none"], rows, p=[0.35, 0.45, 0.2])
    payment = rng.choice(
        ["electronic-check", "credit-card", "bank-transfer", "mailed-check"],
        rows,
        p=[0.35, 0.25, 0.25, 0.15],
    )
    senior = (rng.random(rows) < 0.16).astype(int)
    base_tenure = np.where(contract == "two-year", 48, np.where(contract == "one-year", 30, 14))
    tenure = np.clip(rng.gamma(2.0, base_tenure / 2.0), 1, 72).round().astype(int)
    products = np.clip(rng.poisson(1.2, rows) + 1, 1, 6)
    monthly = (
        (
            20
            + np.where(internet == "fiber", 55, np.where(internet == "dsl", 30, 0))
            + 9 * (products - 1)
            + rng.normal(0, 6, rows)
        )
        .clip(18, 140)
        .round(2)
    )
    total = (monthly * tenure * rng.normal(1.0, 0.04, rows)).clip(18).round(2)
    support_calls = rng.poisson(np.where(internet == "fiber", 1.6, 1.0), rows)
    late_payments = rng.poisson(np.where(payment == "electronic-check", 1.1, 0.4), rows)
    data_gb = (rng.gamma(2.0, 12.0, rows) * np.where(internet == "none", 0.05, 1.0)).round(1)
    paperless = (rng.random(rows) < np.where(payment == "mailed-check", 0.2, 0.7)).astype(int)

    m2m = contract == "month-to-month"
    logit = (
        -3.0
        + 2.4 * m2m
        - 1.6 * (contract == "two-year")
        - 0.07 * tenure
        + 0.035 * (monthly - 65)
        + 0.55 * support_calls
        + 0.75 * late_payments
        + 0.9 * (internet == "fiber") * (support_calls >= 3)
        + 0.6 * (payment == "electronic-check")
        + 0.4 * senior
        - 0.35 * (products - 1)
        + 1.2 * m2m * (tenure < 6)
    )
    churned = (rng.random(rows) < 1 / (1 + np.exp(-1.4 * logit))).astype(int)
    return [
        {
            "tenure_months": int(tenure[i]),
            "contract": str(contract[i]),
            "internet_service": str(internet[i]),
            "payment_method": str(payment[i]),
            "paperless_billing": int(paperless[i]),
            "senior_citizen": int(senior[i]),
            "num_products": int(products[i]),
            "monthly_charges": float(monthly[i]),
            "total_charges": float(total[i]),
            "data_usage_gb": float(data_gb[i]),
            "support_calls_90d": int(support_calls[i]),
            "late_payments_12m": int(late_payments[i]),
            "churned": int(churned[i]),
        }
        for i in range(rows)
    ]


def main() -> None:
    rows = generate()
    out = Path(__file__).with_name("churn.csv")
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {out.name}")


if __name__ == "__main__":
    main()
