"""Small pieces shared by train/, export/ and local_eval/ (submission/ stays self-contained)."""
