import { C as Core } from './core-BMGzPqRb.js';
import { c as coreOpts, m as mount, u as uiOpts } from './opts-flwsQGx_.js';
import { D as DummyLogger } from './logging-CQ2B4GZY.js';

function create(src, elem, opts = {}) {
  const logger = opts.logger ?? new DummyLogger();
  const core = new Core(src, coreOpts(opts, {
    logger
  }));
  const onTerminalReady = () => core.terminalReady();
  const {
    el,
    dispose
  } = mount(core, elem, uiOpts(opts, {
    logger,
    onTerminalReady
  }));
  const ready = core.init();
  void ready.catch(() => {});
  const player = {
    el,
    dispose,
    getCurrentTime: () => core.getCurrentTime(),
    getDuration: () => core.getDuration(),
    play: () => core.play(),
    pause: () => core.pause(),
    seek: pos => core.seek(pos)
  };
  player.addEventListener = (name, callback) => {
    return core.addEventListener(name, callback.bind(player));
  };
  return player;
}

export { create };
