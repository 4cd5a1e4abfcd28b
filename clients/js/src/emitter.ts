/** A small typed event emitter: a listener that throws is reported on the console, never breaks delivery. */
export class Emitter<Events extends Record<string, (...args: never[]) => void>> {
  private listeners = new Map<keyof Events, Set<Events[keyof Events]>>();

  /** Call `listener` on each `name` event; returns a function that removes it. */
  on<K extends keyof Events>(name: K, listener: Events[K]): () => void {
    let set = this.listeners.get(name);
    if (!set) this.listeners.set(name, (set = new Set()));
    set.add(listener);
    return () => this.off(name, listener);
  }

  /** Remove a listener added with {@link on}. */
  off<K extends keyof Events>(name: K, listener: Events[K]): void {
    this.listeners.get(name)?.delete(listener);
  }

  protected emit<K extends keyof Events>(name: K, ...args: Parameters<Events[K]>): void {
    for (const listener of this.listeners.get(name) ?? []) {
      try {
        (listener as (...a: Parameters<Events[K]>) => void)(...args);
      } catch (err) {
        console.error(`eventwire: a "${String(name)}" listener threw`, err);
      }
    }
  }
}
