"""What only the leader does: the election, taking and leaving office (its services run
for a term), and the maintenance sweeps (promoter, reaper)."""
