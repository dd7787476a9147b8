"""The coordinator: Flower ServerApp, FedAvg with privacy reporting, ledger, audit, certificates."""
