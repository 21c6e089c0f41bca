// The shape of output names (`<job_id>-<attempt>-<token>[-<index>].<ext>`), written out independently
// of src/media/storage.ts so a change of names there fails the tests that pin them.
export function mediaPath(jobId: string, attempt: number, ext: string, index = 0): RegExp {
  return new RegExp(`^/media/${jobId}-${attempt}-[0-9a-f]{32}${index === 0 ? '' : `-${index}`}\\.${ext.replace('.', '\\.')}$`);
}

/** The attempt token inside a media path. */
export function tokenOf(path: string): string {
  const match = /-[0-9]{1,3}-([0-9a-f]{32})(-[0-9]+)?\./.exec(path);
  if (!match) throw new Error(`not a media path: ${path}`);
  return match[1];
}
