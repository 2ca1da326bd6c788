"""sharechat: anonymous IRC-style chat rooms over websockets."""
