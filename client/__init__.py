"""The hospital side: Flower ClientApp, local DP-SGD training, the privacy odometer."""
