"""The DPOJob API shared by the operator and the trainer: the spec (source of the CRD schema), the status
schema, what identifies a run, and the trainer's progress/termination-message contract. Needs pydantic only."""
