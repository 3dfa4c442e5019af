"""Trainer that runs inside the DPOJob pod: data -> SFT -> merge -> DPO -> merge -> card -> push."""
