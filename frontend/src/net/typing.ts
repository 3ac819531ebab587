/**
 * When to send `typing start` / `stop`: a start at most every `intervalMs` while the user
 * keeps typing (the server lets a start lapse after 6 s), a stop on send, blur or an emptied
 * composer — and nothing redundant.
 */
export class TypingThrottle {
  private active = false;
  private lastStart = -Infinity;
  constructor(private readonly intervalMs = 3000) {}

  /** The composer changed. */
  input(now: number, hasText: boolean): "start" | "stop" | null {
    if (!hasText) return this.stop();
    if (!this.active || now - this.lastStart >= this.intervalMs) {
      this.active = true;
      this.lastStart = now;
      return "start";
    }
    return null;
  }

  /** Sent, blurred or cleared. */
  stop(): "stop" | null {
    if (!this.active) return null;
    this.active = false;
    this.lastStart = -Infinity;
    return "stop";
  }

  get typing(): boolean {
    return this.active;
  }
}
