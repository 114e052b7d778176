"""medkd toolchain core: CLI, config, data, models, training loop, reports."""
