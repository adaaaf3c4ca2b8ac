-- `raw` is the pipeline's input (inputs: {raw: ...}): rows with a known total only.
SELECT * FROM raw WHERE total_charges IS NOT NULL AND tenure_months >= 0
