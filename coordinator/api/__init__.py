"""The gRPC API: one module per service (tasks, schedules, workers, admin), the
interceptors at its seams, request validation, pagination, and the server itself."""
