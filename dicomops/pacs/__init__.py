"""Clinical side: the PACS as a source of studies and the destination of results (phase 2)."""
