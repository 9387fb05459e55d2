"""asymkd teacher server: a teacher LLM behind the `asymkd.v1.Teacher` gRPC service.

Start one with `asymkd serve --model PATH --backend hf --port 50051`; talk to it with
`teacher_server.client.TeacherClient`.
"""
