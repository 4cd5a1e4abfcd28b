/**
 * Storage adapters: where the queue, the producer id and the next seq live.
 *
 * Every adapter has the same small interface, {@link Storage}: a string
 * key-value store whose calls may be synchronous or return promises. It is
 * React Native's AsyncStorage interface, so MMKV, SQLite or a keychain wrap
 * in a few lines. A write that resolved must be readable after the process is
 * killed; the SDK never sends an event before the write holding it resolved.
 */

/** The interface every storage adapter implements. Keys and values are strings. */
export interface Storage {
  /** The value of `key`, or null when there is none. */
  getItem(key: string): Promise<string | null> | string | null;
  /** Store `value` under `key`; resolve only once it would survive a kill of the app. */
  setItem(key: string, value: string): Promise<void> | void;
  /** Remove `key` (no error when it is missing). */
  removeItem(key: string): Promise<void> | void;
}

/** A storage in memory: the queue does not survive the process (tests, short scripts). */
export function memoryStorage(): Storage {
  const items = new Map<string, string>();
  return {
    getItem: (key) => items.get(key) ?? null,
    setItem: (key, value) => {
      items.set(key, value);
    },
    removeItem: (key) => {
      items.delete(key);
    },
  };
}

/** React Native's AsyncStorage (or anything with its three methods). */
export interface AsyncStorageLike {
  getItem(key: string): Promise<string | null>;
  setItem(key: string, value: string): Promise<void>;
  removeItem(key: string): Promise<void>;
}

/**
 * React Native: `asyncStorage(AsyncStorage)` from `@react-native-async-storage/async-storage`.
 *
 * Args: the AsyncStorage module; `prefix` namespaces the keys (default `eventwire:`).
 */
export function asyncStorage(store: AsyncStorageLike, prefix = "eventwire:"): Storage {
  if (!store || typeof store.getItem !== "function" || typeof store.setItem !== "function") {
    throw new TypeError("asyncStorage() needs an object with getItem, setItem and removeItem");
  }
  return {
    getItem: (key) => store.getItem(prefix + key),
    setItem: (key, value) => store.setItem(prefix + key, value),
    removeItem: (key) => store.removeItem(prefix + key),
  };
}

export interface FileStorageOptions {
  /**
   * fsync each file and the folder before a write resolves (default true): the
   * queue then survives an OS crash or power loss, not only a killed process.
   */
  fsync?: boolean;
}

type Fs = typeof import("node:fs/promises");

// A specifier in a variable: bundlers for React Native and browsers do not try to resolve it.
const fsModule = "node:fs/promises";
const pathModule = "node:path";

/**
 * Node.js (and Electron's main process): one file per key in `dir`, written
 * to a temporary file and renamed, so a kill leaves the old or the new value,
 * never half of one. One process at a time may use a folder.
 */
export function fileStorage(dir: string, options: FileStorageOptions = {}): Storage {
  if (typeof dir !== "string" || !dir) throw new TypeError("fileStorage() needs a folder path");
  const fsync = options.fsync ?? true;
  let ready: Promise<{ fs: Fs; join: (...p: string[]) => string }> | null = null;
  const open = () =>
    (ready ??= (async () => {
      const fs: Fs = await import(fsModule);
      const { join } = (await import(pathModule)) as typeof import("node:path");
      await fs.mkdir(dir, { recursive: true });
      return { fs, join };
    })());
  const file = (join: (...p: string[]) => string, key: string) =>
    join(dir, encodeURIComponent(key).replace(/\./g, "%2E"));
  return {
    async getItem(key) {
      const { fs, join } = await open();
      try {
        return await fs.readFile(file(join, key), "utf8");
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
        throw err;
      }
    },
    async setItem(key, value) {
      const { fs, join } = await open();
      const target = file(join, key);
      const tmp = `${target}.tmp`;
      const handle = await fs.open(tmp, "w");
      try {
        await handle.writeFile(value, "utf8");
        if (fsync) await handle.sync();
      } finally {
        await handle.close();
      }
      await fs.rename(tmp, target);
      if (fsync) {
        // The rename is durable only once the folder's entry is.
        const folder = await fs.open(dir, "r");
        try {
          await folder.sync();
        } finally {
          await folder.close();
        }
      }
    },
    async removeItem(key) {
      const { fs, join } = await open();
      await fs.rm(file(join, key), { force: true });
    },
  };
}
