"""What the coordinator and the hospitals share: config, data, model, DP-SGD, accounting."""
