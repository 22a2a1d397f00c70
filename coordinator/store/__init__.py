"""PostgreSQL access for the coordinator: one module per table, SQL kept plain."""
