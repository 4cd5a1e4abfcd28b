/** eventwire: live, acked, exactly-once event tracking for React Native and Node.js. */
export { Eventwire, randomUuid } from "./client.js";
export type { EventwireOptions, Rejection, Stats, Status } from "./client.js";
export { asyncStorage, fileStorage, memoryStorage } from "./storage.js";
export type { AsyncStorageLike, FileStorageOptions, Storage } from "./storage.js";
export type { Encoding } from "./codec.js";
export type { AppInfo, PlatformLike } from "./context.js";
export { SDK_VERSION } from "./context.js";
