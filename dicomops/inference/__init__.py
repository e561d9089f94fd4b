"""Scoring new studies with the registered champion: the library the PACS path and the inference
service share, so both apply exactly the preprocessing and the series score the model was trained with."""
