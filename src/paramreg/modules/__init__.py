"""The mechanism on ``nn.Module``: the carrier, the canonical walk, module classes, state-dict
hooks, the export guard, binding one tensor, selection, and the all-or-nothing rollback."""
