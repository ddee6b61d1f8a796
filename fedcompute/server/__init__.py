"""Orchestration servers: task management, assignment, upload, resources, the aggregation job front."""
